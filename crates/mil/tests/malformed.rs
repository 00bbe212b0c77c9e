//! Malformed programs and model directories: each gives the error kind, the line:column
//! and (where an op is at fault) the op's name that a user needs, and none panics.
//!
//! Line:column values were counted by hand on the texts below (body lines start at
//! line 5, column 9).

use half::f16;
use mil::blob::{write_blob_file, ModelDir, Weights, HEADER_BYTES};
use mil::builder::FunctionBuilder;
use mil::text::parse_and_validate;
use mil::{DType, Dialect, Error, ErrorKind, Program, TensorType};

/// A program whose `main` takes `x: [1, 4, 1, 2]` fp16, runs `body` (one op a line,
/// from line 5, column 9) and returns `outputs`.
fn main_with(body: &[&str], outputs: &str) -> String {
    let mut s = String::from(
        "program(1.3)\n[buildInfo = dict<string, string>({})]\n{\n    func main<ios18>(tensor<fp16, [1, 4, 1, 2]> x) {\n",
    );
    for line in body {
        s.push_str("        ");
        s.push_str(line);
        s.push('\n');
    }
    s.push_str(&format!("    }} -> ({outputs});\n}}\n"));
    s
}

const TWO: &str = r#"fp16 two = const()[name = string("two"), val = fp16(2)];"#;
const Y_MUL: &str = r#"tensor<fp16, [1, 4, 1, 2]> y = mul(x = x, y = two)[name = string("y")];"#;

struct Case {
    what: &'static str,
    text: String,
    kind: ErrorKind,
    at: (u32, u32),
    op: Option<&'static str>,
    /// A piece of the message, so the error says the right thing, not only where.
    says: &'static str,
}

fn case(
    what: &'static str,
    text: String,
    kind: ErrorKind,
    at: (u32, u32),
    op: Option<&'static str>,
    says: &'static str,
) -> Case {
    Case { what, text, kind, at, op, says }
}

fn check(e: &Error, c: &Case) {
    let span = e.span.unwrap_or_else(|| panic!("{}: no span in {e}", c.what));
    assert_eq!(e.kind, c.kind, "{}: {e}", c.what);
    assert_eq!((span.line, span.col), c.at, "{}: {e}", c.what);
    assert_eq!(e.op.as_deref(), c.op, "{}: {e}", c.what);
    assert!(e.message.contains(c.says), "{}: message `{}` lacks `{}`", c.what, e.message, c.says);
}

fn text_cases() -> Vec<Case> {
    use ErrorKind::*;
    let y_relu = |name: &str| format!(r#"tensor<fp16, [1, 4, 1, 2]> {name} = relu(x = x)[name = string("{name}")];"#);
    let ok = main_with(&[TWO, Y_MUL], "y");
    let truncated_at = |pat: &str| ok[..ok.find(pat).unwrap()].to_string();
    vec![
        case(
            "empty text",
            String::new(),
            Syntax,
            (1, 1),
            None,
            "expected `program` at the start of a MIL program, found end of input",
        ),
        case("only a comment", "  // nothing here\n".into(), Syntax, (2, 1), None, "found end of input"),
        case(
            "truncated after the version",
            "program(1.3)".into(),
            Syntax,
            (1, 13),
            None,
            "expected `{` to open the program body, found end of input",
        ),
        case(
            "truncated in the arguments",
            truncated_at(", y = two)"),
            Syntax,
            (6, 49),
            None,
            "expected `)` after the arguments, found end of input",
        ),
        case(
            "truncated in a string",
            truncated_at("y\")];\n    }"),
            Syntax,
            (6, 75),
            None,
            "unterminated string starting at 6:74",
        ),
        case(
            "truncated before the outputs",
            truncated_at(" -> (y)"),
            Syntax,
            (7, 6),
            None,
            "expected `->` and the function's outputs after its body, found end of input",
        ),
        case(
            "unsupported version",
            "program(2.0)\n{\n}".into(),
            Syntax,
            (1, 9),
            None,
            "unsupported program version `2.0`",
        ),
        case("empty program", "program(1.3)\n{\n}\n".into(), Syntax, (3, 1), None, "expected `func`"),
        case(
            "text after the program",
            format!("{ok}}}"),
            Syntax,
            (9, 1),
            None,
            "expected end of input after the program's closing `}`",
        ),
        case(
            "stray character",
            main_with(&[r#"tensor<fp16, [1, 4, 1, 2]> y = relu(x = x)[name = string("y")]; # done"#], "y"),
            Syntax,
            (5, 73),
            None,
            "unexpected character `#`",
        ),
        case(
            "unknown string escape",
            main_with(&[r#"tensor<fp16, [1, 4, 1, 2]> y = relu(x = x)[name = string("a\q")];"#], "y"),
            Syntax,
            (5, 68),
            None,
            "unknown escape `\\q`",
        ),
        case(
            "missing semicolon",
            main_with(&[r#"tensor<fp16, [1, 4, 1, 2]> y = relu(x = x)[name = string("y")]"#], "y"),
            Syntax,
            (6, 5),
            None,
            "expected `;` after the op, found `}`",
        ),
        case(
            "unknown element type",
            main_with(&["tensor<int8, [2]> q = const()[name = string(\"q\"), val = tensor<int8, [2]>([1, 2])];"], "x"),
            Syntax,
            (5, 16),
            None,
            "unknown element type `int8`",
        ),
        case(
            "negative dimension",
            main_with(&[r#"tensor<fp16, [1, -4, 1, 2]> y = relu(x = x)[name = string("y")];"#], "y"),
            Syntax,
            (5, 26),
            None,
            "expected a dimension (a non-negative integer), found number `-4`",
        ),
        case(
            "name given twice",
            main_with(&[r#"tensor<fp16, [1, 4, 1, 2]> y = relu(x = x)[name = string("y"), name = string("z")];"#], "y"),
            Syntax,
            (5, 72),
            None,
            "attribute `name` is given twice",
        ),
        case(
            "BLOBFILE without offset",
            main_with(
                &[
                    r#"tensor<fp16, [4, 4, 1, 1]> w = const()[name = string("w"), val = tensor<fp16, [4, 4, 1, 1]>(BLOBFILE(path = string("@model_path/weights/w.bin")))];"#,
                ],
                "x",
            ),
            Syntax,
            (5, 101),
            None,
            "BLOBFILE needs an `offset`",
        ),
        case(
            "tuples nested too deep",
            main_with(
                &[&format!(
                    "tensor<fp16, [1, 4, 1, 2]> y = relu(x = {}x{})[name = string(\"y\")];",
                    "(".repeat(100),
                    ")".repeat(100)
                )],
                "y",
            ),
            Syntax,
            (5, 114),
            None,
            "nest deeper than 64",
        ),
        // Literals.
        case(
            "int32 with a fraction",
            main_with(&[r#"int32 g = const()[name = string("g"), val = int32(1.5)];"#], "x"),
            BadLiteral,
            (5, 59),
            None,
            "`1.5` is not an int32",
        ),
        case(
            "int32 out of range",
            main_with(&[r#"int32 g = const()[name = string("g"), val = int32(3000000000)];"#], "x"),
            BadLiteral,
            (5, 59),
            None,
            "is not an int32",
        ),
        case(
            "three values for [4]",
            main_with(
                &[r#"tensor<int32, [4]> p = const()[name = string("p"), val = tensor<int32, [4]>([0, 0, 0])];"#],
                "x",
            ),
            BadLiteral,
            (5, 66),
            None,
            "needs 4 values, found 3",
        ),
        case(
            "short row in a nested literal",
            main_with(
                &[
                    r#"tensor<fp16, [2, 2]> m = const()[name = string("m"), val = tensor<fp16, [2, 2]>([[1, 2], [3]])];"#,
                ],
                "x",
            ),
            BadLiteral,
            (5, 98),
            None,
            "needs 2 entries, found 1",
        ),
        case(
            "negative uint64",
            main_with(
                &[
                    r#"tensor<fp16, [4, 4, 1, 1]> w = const()[name = string("w"), val = tensor<fp16, [4, 4, 1, 1]>(BLOBFILE(path = string("@model_path/weights/w.bin"), offset = uint64(-64)))];"#,
                ],
                "x",
            ),
            BadLiteral,
            (5, 170),
            None,
            "`-64` is negative",
        ),
        case(
            "bool that is not",
            main_with(&[r#"bool t = const()[name = string("t"), val = bool(yes)];"#], "x"),
            BadLiteral,
            (5, 57),
            None,
            "`yes` is not a bool",
        ),
        case(
            "fp16 given a string",
            main_with(&[r#"fp16 k = const()[name = string("k"), val = fp16("two")];"#], "x"),
            BadLiteral,
            (5, 57),
            None,
            "expected a fp16 value, found string \"two\"",
        ),
        case(
            "scalar given a list",
            main_with(&[r#"fp16 k = const()[name = string("k"), val = fp16([1])];"#], "x"),
            BadLiteral,
            (5, 57),
            None,
            "a scalar tensor<fp16, []> takes one value, found a list",
        ),
        case(
            "name that is not a string",
            main_with(&[r#"tensor<fp16, [1, 4, 1, 2]> y = relu(x = x)[name = int32(1)];"#], "y"),
            BadLiteral,
            (5, 59),
            None,
            "the op's `name` must be a string",
        ),
        // Validation: ops, names, types.
        case(
            "unknown op",
            main_with(&[r#"tensor<fp16, [1, 4, 1, 2]> y = frobnicate(x = x)[name = string("y")];"#], "y"),
            UnknownOp,
            (5, 9),
            Some("y"),
            "unknown op `frobnicate`",
        ),
        case(
            "undefined name",
            main_with(&[TWO, r#"tensor<fp16, [1, 4, 1, 2]> y = mul(x = x, y = nope)[name = string("y")];"#], "y"),
            UndefinedName,
            (6, 9),
            Some("y"),
            "`nope`, which is not defined",
        ),
        case(
            "used before defined",
            main_with(&[Y_MUL, TWO], "y"),
            UndefinedName,
            (5, 9),
            Some("y"),
            "`two`, which is not defined",
        ),
        case(
            "duplicate name",
            main_with(&[TWO, Y_MUL, &y_relu("y").replace("string(\"y\")", "string(\"y2\")")], "y"),
            DuplicateName,
            (7, 9),
            Some("y2"),
            "`y` is already defined",
        ),
        case(
            "duplicate input",
            main_with(&[], "x").replace(
                "tensor<fp16, [1, 4, 1, 2]> x)",
                "tensor<fp16, [1, 4, 1, 2]> x, tensor<fp16, [1, 4, 1, 2]> x)",
            ),
            DuplicateName,
            (4, 5),
            None,
            "input `x` is declared twice",
        ),
        case(
            "declared dtype differs",
            main_with(&[TWO, &Y_MUL.replace("tensor<fp16, [1, 4, 1, 2]> y", "tensor<fp32, [1, 4, 1, 2]> y")], "y"),
            TypeMismatch,
            (6, 9),
            Some("y"),
            "`y` is declared tensor<fp32, [1, 4, 1, 2]>, but `mul` gives tensor<fp16, [1, 4, 1, 2]>",
        ),
        case(
            "operands of two dtypes",
            main_with(&[&TWO.replace("fp16", "fp32"), Y_MUL], "y"),
            TypeMismatch,
            (6, 9),
            Some("y"),
            "x is fp16 but y is fp32",
        ),
        case(
            "integer input",
            main_with(&[], "x").replace("tensor<fp16, [1, 4, 1, 2]> x)", "tensor<int32, [1, 4, 1, 2]> x)"),
            TypeMismatch,
            (4, 5),
            None,
            "inputs must be fp16 or fp32",
        ),
        case(
            "declared shape differs",
            main_with(&[&y_relu("y").replace("[1, 4, 1, 2]> y", "[1, 4, 1, 3]> y")], "y"),
            ShapeMismatch,
            (5, 9),
            Some("y"),
            "declared tensor<fp16, [1, 4, 1, 3]>",
        ),
        case(
            "shapes that do not broadcast",
            main_with(
                &[
                    r#"tensor<fp16, [3]> b = const()[name = string("b"), val = tensor<fp16, [3]>([1, 2, 3])];"#,
                    r#"tensor<fp16, [1, 4, 1, 3]> y = add(x = x, y = b)[name = string("y")];"#,
                ],
                "y",
            ),
            ShapeMismatch,
            (6, 9),
            Some("y"),
            "do not broadcast",
        ),
        case(
            "matmul inner dimensions",
            main_with(
                &[
                    r#"bool f = const()[name = string("f"), val = bool(false)];"#,
                    r#"tensor<fp16, [1, 4, 1, 1]> y = matmul(transpose_x = f, transpose_y = f, x = x, y = x)[name = string("y")];"#,
                ],
                "y",
            ),
            ShapeMismatch,
            (6, 9),
            Some("y"),
            "matmul inner dimensions differ",
        ),
        case(
            "reshape to a wrong count",
            main_with(
                &[
                    r#"tensor<int32, [2]> s = const()[name = string("s"), val = tensor<int32, [2]>([3, 3])];"#,
                    r#"tensor<fp16, [3, 3]> y = reshape(shape = s, x = x)[name = string("y")];"#,
                ],
                "y",
            ),
            ShapeMismatch,
            (6, 9),
            Some("y"),
            "cannot reshape",
        ),
        case(
            "missing argument",
            main_with(&[r#"tensor<fp16, [1, 4, 1, 2]> y = mul(x = x)[name = string("y")];"#], "y"),
            BadArgument,
            (5, 9),
            Some("y"),
            "`mul` needs argument `y`",
        ),
        case(
            "unknown argument",
            main_with(&[TWO, r#"tensor<fp16, [1, 4, 1, 2]> y = relu(x = x, alpha = two)[name = string("y")];"#], "y"),
            BadArgument,
            (6, 9),
            Some("y"),
            "`relu` takes no argument `alpha`",
        ),
        case(
            "argument given twice",
            main_with(&[TWO, r#"tensor<fp16, [1, 4, 1, 2]> y = mul(x = x, x = x, y = two)[name = string("y")];"#], "y"),
            BadArgument,
            (6, 9),
            Some("y"),
            "argument `x` is given twice",
        ),
        case(
            "computed value where a constant is needed",
            main_with(&[r#"tensor<fp16, [1, 4, 1, 2]> y = softmax(axis = x, x = x)[name = string("y")];"#], "y"),
            BadArgument,
            (5, 9),
            Some("y"),
            "must be a constant",
        ),
        case(
            "split into fewer parts than declared",
            main_with(
                &[
                    r#"int32 ax = const()[name = string("ax"), val = int32(1)];"#,
                    r#"int32 n = const()[name = string("n"), val = int32(2)];"#,
                    r#"tensor<fp16, [1, 2, 1, 2]> a, tensor<fp16, [1, 2, 1, 2]> b, tensor<fp16, [1, 2, 1, 2]> c = split(axis = ax, num_splits = n, x = x)[name = string("s")];"#,
                ],
                "a",
            ),
            BadArgument,
            (7, 9),
            Some("s"),
            "split makes 2 parts but 3 outputs are declared",
        ),
        case(
            "output undefined",
            main_with(&[TWO, Y_MUL], "z"),
            UndefinedName,
            (4, 5),
            None,
            "returns `z`, which is not defined",
        ),
        case("no outputs", main_with(&[TWO, Y_MUL], ""), BadArgument, (4, 5), None, "returns nothing"),
        case(
            "an unknown opset",
            main_with(&[TWO, Y_MUL], "y").replace("main<ios18>", "main<ios99>"),
            Syntax,
            (4, 5),
            None,
            "opset `ios99`: expected ios16 or ios18",
        ),
        case(
            "a decimal literal beyond f64",
            main_with(&[&TWO.replace("fp16(2)", "fp16(1e99999)"), Y_MUL], "y"),
            BadLiteral,
            (5, 61),
            None,
            "`1e99999` is out of range for fp16",
        ),
        case(
            "a literal beyond fp16",
            main_with(&[&TWO.replace("fp16(2)", "fp16(70000)"), Y_MUL], "y"),
            BadLiteral,
            (5, 61),
            None,
            "`70000` is out of range for fp16",
        ),
        case(
            "a softmax without its axis",
            main_with(&[r#"tensor<fp16, [1, 4, 1, 2]> y = softmax(x = x)[name = string("y")];"#], "y"),
            BadArgument,
            (5, 9),
            Some("y"),
            "`softmax` needs argument `axis`",
        ),
    ]
}

#[test]
fn malformed_programs_say_what_and_where() {
    let cases = text_cases();
    assert!(cases.len() >= 30);
    for c in &cases {
        let e = parse_and_validate(&c.text).expect_err(c.what);
        check(&e, c);
    }
}

#[test]
fn every_prefix_of_a_program_is_an_error_not_a_panic() {
    let ok = main_with(&[TWO, Y_MUL], "y");
    parse_and_validate(&ok).unwrap();
    let cut_points: Vec<usize> = ok.char_indices().map(|(i, _)| i).collect();
    for &end in &cut_points[..cut_points.len() - 1] {
        let e = parse_and_validate(&ok[..end]).expect_err("a strict prefix is never a program");
        assert_eq!(e.kind, ErrorKind::Syntax, "prefix of {end} bytes: {e}");
        assert!(e.span.is_some(), "prefix of {end} bytes: {e}");
    }
}

// ---- model directories ----

/// A model directory holding one conv whose weight is `w: [4, 4, 1, 1]` in
/// `weights/w.bin`; `edit` changes the files before reading.
fn model_dir_with(
    edit: impl FnOnce(&std::path::Path, &mut String, &mut Vec<u8>),
) -> (tempfile::TempDir, Result<ModelDir, Error>) {
    let mut weights = Weights::new();
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    let x = b.input("x", TensorType::surface(DType::Fp16, 4, 2));
    let w = b.constant("w", weights.add_tensor("w", &[4, 4, 1, 1], &[0.5; 16]));
    let y = b.conv1x1("y", &x, &w);
    b.output(&y);
    let model = ModelDir { program: Program::new(Dialect::Ios18, b.finish().unwrap()), weights };
    let dir = tempfile::tempdir().unwrap();
    model.write(dir.path()).unwrap();
    let mil = dir.path().join("model.mil");
    let bin = dir.path().join("weights/w.bin");
    let mut text = std::fs::read_to_string(&mil).unwrap();
    let mut bytes = std::fs::read(&bin).unwrap();
    edit(dir.path(), &mut text, &mut bytes);
    std::fs::write(&mil, text).unwrap();
    if !bytes.is_empty() {
        std::fs::write(&bin, bytes).unwrap();
    } else {
        std::fs::remove_file(&bin).unwrap();
    }
    let read = ModelDir::read(dir.path());
    (dir, read)
}

/// The op `w` (or the op inserted before it) is on line 5 of the printed model.mil
/// (after program, buildInfo, `{`, and the function header), at column 9.
const W_AT: (u32, u32) = (5, 9);

#[test]
fn an_untouched_model_directory_reads() {
    let (_dir, read) = model_dir_with(|_, _, _| {});
    read.unwrap();
}

#[test]
fn malformed_model_directories_name_the_file_op_and_line() {
    type Edit = Box<dyn FnOnce(&std::path::Path, &mut String, &mut Vec<u8>)>;
    // An unused fp32 constant stored as a BLOBFILE, on its own line before `w`.
    let fp32_blob = |t: &mut String| {
        let line = "        tensor<fp32, [2]> u = const()[name = string(\"u\"), val = tensor<fp32, [2]>(BLOBFILE(path = string(\"@model_path/weights/w.bin\"), offset = uint64(64)))];\n";
        let at = t.find("        tensor<fp16, [4, 4, 1, 1]> w").unwrap();
        t.insert_str(at, line);
    };
    let cases: Vec<(&str, Edit, &str, &str)> = vec![
        (
            "missing weight file",
            Box::new(|_, _, b| b.clear()),
            "weight file `@model_path/weights/w.bin` is missing",
            "w",
        ),
        ("short weight file", Box::new(|_, _, b| b.truncate(b.len() - 1)), "past the end of the 159-byte file", "w"),
        ("file shorter than its header", Box::new(|_, _, b| b.truncate(10)), "shorter than its 64-byte header", "w"),
        (
            "offset out of range",
            Box::new(|_, t, _| *t = t.replace("uint64(64)", "uint64(4096)")),
            "chunk offset 4096 is out of range",
            "w",
        ),
        (
            "offset between chunks",
            Box::new(|_, t, _| *t = t.replace("uint64(64)", "uint64(66)")),
            "no chunk header at offset 66",
            "w",
        ),
        (
            "bad chunk magic",
            Box::new(|_, _, b| b[HEADER_BYTES] = 0xEE),
            "expected magic EF BE AD DE, found [EE, BE, AD, DE]",
            "w",
        ),
        (
            "chunk of another data type",
            Box::new(|_, _, b| b[HEADER_BYTES + 4] = 2),
            "data type code 2, expected 1 (fp16)",
            "w",
        ),
        ("wrong file version", Box::new(|_, _, b| b[4] = 3), "format version 3, expected 2", "w"),
        (
            "chunk smaller than the declared tensor",
            Box::new(|_, _, b| *b = write_blob_file(&[&[f16::ONE; 8]])),
            "holds 16 bytes, expected 32 (16 fp16 values)",
            "w",
        ),
        (
            "BLOBFILE of fp32",
            Box::new(move |_, t, _| fp32_blob(t)),
            "BLOBFILE tensors are fp16 here, found tensor<fp32, [2]>",
            "u",
        ),
        (
            "weight path leaving the directory",
            Box::new(|_, t, _| *t = t.replace("@model_path/weights/w.bin", "@model_path/../w.bin")),
            "does not name a file inside the model directory",
            "w",
        ),
    ];
    for (what, edit, says, op) in cases {
        let (dir, read) = model_dir_with(edit);
        let e = read.expect_err(what);
        let span = e.span.unwrap_or_else(|| panic!("{what}: no span in {e}"));
        assert_eq!(e.kind, ErrorKind::Blob, "{what}: {e}");
        assert!(e.message.contains(says), "{what}: `{}` lacks `{says}`", e.message);
        assert_eq!((span.line, span.col), W_AT, "{what}: {e}");
        assert_eq!(e.op.as_deref(), Some(op), "{what}: {e}");
        if what != "weight path leaving the directory" {
            assert_eq!(e.file.as_deref(), Some(dir.path().join("weights/w.bin").as_path()), "{what}: {e}");
        }
    }
}

#[test]
fn missing_or_broken_model_mil_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let e = ModelDir::read(dir.path()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Io);
    assert_eq!(e.file.as_deref(), Some(dir.path().join("model.mil").as_path()));

    let (dir, read) = model_dir_with(|_, t, _| *t = t.replace("conv(", "conv2("));
    let e = read.unwrap_err();
    assert_eq!(e.kind, ErrorKind::UnknownOp);
    assert_eq!(e.file.as_deref(), Some(dir.path().join("model.mil").as_path()));
    let span = e.span.unwrap();
    assert_eq!((span.line, span.col, e.op.as_deref()), (10, 9, Some("y")), "{e}");
    assert!(
        e.to_string()
            .starts_with(&format!("{}:10:9: op `y`: unknown op `conv2`", dir.path().join("model.mil").display())),
        "{e}"
    );
}
