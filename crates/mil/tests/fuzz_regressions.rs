//! Inputs that once crashed the parser or the validator (found by the `fuzz/` target
//! or while preparing it), each with the error it must give instead.

use mil::text::{parse, parse_and_validate, print};
use mil::ErrorKind;

/// Parses and validates `text`, which must fail with `kind` at `line`, saying `says`.
fn rejects(text: &str, kind: ErrorKind, line: u32, says: &str) {
    let e = parse_and_validate(text).expect_err(says);
    assert_eq!(e.kind, kind, "{e}");
    assert_eq!(e.span.map(|s| s.line), Some(line), "{e}");
    assert!(e.message.contains(says), "`{}` lacks `{says}`", e.message);
}

#[test]
fn conv_with_an_empty_kernel() {
    // `(k - 1) * dilation` underflowed for a kernel dimension of 0.
    rejects(
        r#"program(1.3)
{
    func main<ios18>(tensor<fp16, [1, 4, 1, 2]> x) {
        tensor<fp16, [4, 4, 0, 1]> w = const()[name = string("w"), val = tensor<fp16, [4, 4, 0, 1]>([])];
        tensor<fp16, [1, 4, 1, 2]> y = conv(weight = w, x = x)[name = string("y")];
    } -> (y);
}"#,
        ErrorKind::ShapeMismatch,
        5,
        "has an empty kernel",
    );
}

#[test]
fn same_padding_of_an_empty_input() {
    // `out - 1` underflowed for "same" padding when the input's height was 0.
    rejects(
        r#"program(1.3)
{
    func main<ios18>(tensor<fp16, [1, 4, 0, 2]> x) {
        tensor<fp16, [4, 4, 1, 1]> w = const()[name = string("w"), val = tensor<fp16, [4, 4, 1, 1]>(BLOBFILE(path = string("@model_path/w.bin"), offset = uint64(64)))];
        string same = const()[name = string("same"), val = string("same")];
        tensor<fp16, [1, 4, 1, 2]> y = conv(weight = w, x = x, pad_type = same)[name = string("y")];
    } -> (y);
}"#,
        ErrorKind::ShapeMismatch,
        6,
        "conv kernel span 1 is larger than the padded input 0",
    );
}

#[test]
fn reshape_to_more_elements_than_fit() {
    // The product of the target shape overflowed.
    rejects(
        r#"program(1.3)
{
    func main<ios18>(tensor<fp16, [1, 4, 1, 2]> x) {
        tensor<int32, [3]> s = const()[name = string("s"), val = tensor<int32, [3]>([2147483647, 2147483647, 2147483647])];
        tensor<fp16, [1, 4, 1, 2]> y = reshape(shape = s, x = x)[name = string("y")];
    } -> (y);
}"#,
        ErrorKind::ShapeMismatch,
        5,
        "too many elements",
    );
}

#[test]
fn split_of_an_empty_axis_into_two_billion_parts() {
    // `vec![0; 2147483647]` of part sizes exhausted memory.
    rejects(
        r#"program(1.3)
{
    func main<ios18>(tensor<fp16, [1, 0, 1, 2]> x) {
        int32 n = const()[name = string("n"), val = int32(2147483647)];
        int32 ax = const()[name = string("ax"), val = int32(1)];
        tensor<fp16, [1, 0, 1, 2]> y = split(num_splits = n, axis = ax, x = x)[name = string("y")];
    } -> (y);
}"#,
        ErrorKind::ShapeMismatch,
        6,
        "num_splits 2147483647 does not divide dimension 0",
    );
}

#[test]
fn shapes_whose_element_count_overflows_are_refused_by_the_parser() {
    let text = "program(1.3)\n{\n    func main<ios18>(tensor<fp16, [2147483647, 2147483647, 2147483647]> x) {\n    } -> (x);\n}";
    let e = parse(text).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Syntax);
    assert_eq!(e.span.map(|s| (s.line, s.col)), Some((3, 35)));
}

#[test]
fn empty_literals_of_huge_shapes_print_briefly() {
    // A [2^31 - 1, 0] literal holds no values; printing it nested would write 2^31
    // empty rows, so the printer writes `[]`.
    let text = r#"program(1.3)
{
    func main<ios18>(tensor<fp16, [1]> x) {
        tensor<fp16, [2147483647, 0]> e = const()[name = string("e"), val = tensor<fp16, [2147483647, 0]>([])];
    } -> (x);
}"#;
    let p = parse_and_validate(text).unwrap();
    let printed = print(&p);
    assert!(printed.contains("val = tensor<fp16, [2147483647, 0]>([])"), "{printed}");
    assert_eq!(parse(&printed).unwrap(), p);
}

/// A program with scalar constants `a` (fp16), `ax`, `n` (int32), `f` (bool) and
/// one-element lists `axs`, `idx` (int32), then `op_line` on line 10.
fn scalar_program(op_line: &str) -> String {
    format!(
        r#"program(1.3)
{{
    func main<ios18>(tensor<fp16, [1, 4, 1, 2]> x) {{
        fp16 a = const()[name = string("a"), val = fp16(1)];
        int32 ax = const()[name = string("ax"), val = int32(0)];
        int32 n = const()[name = string("n"), val = int32(1)];
        bool f = const()[name = string("f"), val = bool(false)];
        tensor<int32, [1]> axs = const()[name = string("axs"), val = tensor<int32, [1]>([0])];
        tensor<int32, [1]> idx = const()[name = string("idx"), val = tensor<int32, [1]>([0])];
        {op_line}
    }} -> (x);
}}"#
    )
}

#[test]
fn ops_that_index_an_axis_refuse_scalars() {
    // Axis 0 of a rank-0 tensor passed `norm_axis`, then indexed an empty shape.
    for op_line in [
        r#"fp16 y = concat(values = (a, a), axis = ax, interleave = f)[name = string("y")];"#,
        r#"fp16 y = split(x = a, axis = ax, num_splits = n)[name = string("y")];"#,
        r#"fp16 y = gather(x = a, indices = idx, axis = ax)[name = string("y")];"#,
        r#"fp16 y = squeeze(x = a, axes = axs)[name = string("y")];"#,
    ] {
        rejects(&scalar_program(op_line), ErrorKind::BadArgument, 10, "axis 0: a scalar has no axes");
    }
    // A softmax or a reduction of a scalar is still fine.
    let fine = scalar_program(
        r#"fp16 y = softmax(x = a, axis = ax)[name = string("y")];
        fp16 z = reduce_sum(x = a, axes = axs)[name = string("z")];"#,
    );
    parse_and_validate(&fine).unwrap();
}

#[test]
fn literals_of_very_high_rank_print_flat() {
    // A rank-70 literal parses in flat form; printed nested it would nest deeper than
    // the parser follows, so it must be printed flat.
    let shape = vec!["1"; 70].join(", ");
    let text = format!(
        "program(1.3)\n{{\n    func main<ios18>(tensor<fp16, [1]> x) {{\n        tensor<fp16, [{shape}]> e = const()[name = string(\"e\"), val = tensor<fp16, [{shape}]>([0.5])];\n    }} -> (x);\n}}"
    );
    let p = parse_and_validate(&text).unwrap();
    let printed = print(&p);
    assert!(printed.contains(&format!("val = tensor<fp16, [{shape}]>([0.5])")), "{printed}");
    assert_eq!(parse(&printed).unwrap(), p);
    // Rank 64, the deepest nesting the parser follows, still prints nested.
    let shape = vec!["1"; 64].join(", ");
    let text = text.replace(&vec!["1"; 70].join(", "), &shape);
    let printed = print(&parse(&text).unwrap());
    assert!(printed.contains(&format!("{}0.5{}", "[".repeat(64), "]".repeat(64))), "{printed}");
    parse(&printed).unwrap();
}
