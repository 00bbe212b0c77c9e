//! The ANE lint: one program per rule that triggers exactly that rule, a realistic clean
//! program that triggers none, and a check that every rule in `RULES` is exercised here.

use std::collections::BTreeSet;

use mil::blob::{chunk_offsets, Weights};
use mil::builder::FunctionBuilder;
use mil::lint::{self, Severity, RULES};
use mil::{Arg, DType, Dialect, Function, Operation, Program, Span, TensorType, Value, Var};

/// fp16 `[1, C, 1, S]` surfaces of 64 KiB: above the 48 KiB floor, width a multiple of 16.
fn big16() -> TensorType {
    TensorType::surface(DType::Fp16, 512, 64)
}

fn program(dialect: Dialect, f: Function) -> Program {
    Program::new(dialect, f)
}

/// Appends an op the builder does not know (the lint must read any op).
fn raw_op(f: &mut Function, op: &str, name: &str, args: &[(&str, &str)], out: TensorType) -> Var {
    let v = Var::new(name, out);
    f.ops.push(Operation {
        op: op.into(),
        name: name.into(),
        outputs: vec![v.clone()],
        args: args.iter().map(|(k, a)| (k.to_string(), Arg::Var(a.to_string()))).collect(),
        attrs: Vec::new(),
        span: Span::new(7, 9),
    });
    v
}

fn rules_of(p: &Program) -> BTreeSet<&'static str> {
    lint::lint(p).iter().map(|f| f.rule).collect()
}

fn cast_in_ios16() -> Program {
    let mut b = FunctionBuilder::new("main", Dialect::Ios16);
    let x = b.input("x", big16());
    let y = b.cast("y", &x, DType::Fp16);
    b.output(&y);
    program(Dialect::Ios16, b.finish().unwrap())
}

fn fp32_io_in_ios16() -> Program {
    let mut b = FunctionBuilder::new("main", Dialect::Ios16);
    let x = b.input("x", TensorType::surface(DType::Fp32, 256, 64));
    let y = b.relu("y", &x);
    b.output(&y);
    program(Dialect::Ios16, b.finish().unwrap())
}

fn io_dtype() -> Program {
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    // int32 [1, 512, 1, 64]: 128 KiB, width a multiple of 16: only the dtype is wrong.
    let ids = b.input("ids", TensorType::surface(DType::Int32, 512, 64));
    let y = b.cast("y", &ids, DType::Fp16);
    b.output(&y);
    program(Dialect::Ios18, b.finish().unwrap())
}

fn sdpa(with_mask: bool) -> Program {
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    for n in ["k", "mask", "q", "v"] {
        if n != "mask" || with_mask {
            b.input(n, big16());
        }
    }
    let q = Var::new("q", big16());
    b.output(&q);
    let mut f = b.finish().unwrap();
    let mut args = vec![("query", "q"), ("key", "k"), ("value", "v")];
    if with_mask {
        args.push(("attn_mask", "mask"));
    }
    raw_op(&mut f, "scaled_dot_product_attention", "attn", &args, big16());
    f.outputs = vec!["attn".into()];
    program(Dialect::Ios18, f)
}

fn dimension_too_large() -> Program {
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    let x = b.input("x", TensorType::surface(DType::Fp16, 1, 65552));
    let y = b.relu("y", &x);
    b.output(&y);
    program(Dialect::Ios18, b.finish().unwrap())
}

/// `concat` on the batch axis (the channel and spatial axes of rank-4 values are how
/// the seed returns several results, and are not flagged).
fn concat() -> Program {
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    let x = b.input("x", big16());
    let z = b.concat("z", &[&x, &x], 0);
    b.output(&z);
    program(Dialect::Ios18, b.finish().unwrap())
}

/// Two inputs, one output: the several-surface convention.
fn several_inputs() -> Program {
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    let x = b.input("x", big16());
    let w = b.input("w", big16());
    let y = b.add("y", &x, &w);
    b.output(&y);
    program(Dialect::Ios18, b.finish().unwrap())
}

fn several_outputs() -> Program {
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    let x = b.input("x", big16());
    let y = b.relu("y", &x);
    let z = b.sigmoid("z", &x);
    b.output(&y);
    b.output(&z);
    program(Dialect::Ios18, b.finish().unwrap())
}

/// A rank-2 value between two rank-4 ones.
fn rank() -> Program {
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    let x = b.input("x", big16());
    let m = b.reshape("m", &x, &[512, 64]);
    let r = b.relu("r", &m);
    let y = b.reshape("y", &r, &[1, 512, 1, 64]);
    b.output(&y);
    program(Dialect::Ios18, b.finish().unwrap())
}

/// An input 192 positions wide of which the program reads 64.
fn padding() -> Program {
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    let x = b.input("x", TensorType::surface(DType::Fp16, 512, 192));
    let s = b.slice_by_size("s", &x, &[0, 0, 0, 0], &[1, 512, 1, 64]);
    let y = b.relu("y", &s);
    b.output(&y);
    program(Dialect::Ios18, b.finish().unwrap())
}

fn unequal_surface_sizes() -> Program {
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    let a = b.input("a", big16());
    let c = b.input("c", TensorType::surface(DType::Fp16, 1024, 64));
    let ya = b.relu("ya", &a);
    let yc = b.relu("yc", &c);
    b.output(&ya);
    b.output(&yc);
    program(Dialect::Ios18, b.finish().unwrap())
}

/// Small surfaces matter only with several of them (Orion's rule; the seed's single
/// surfaces have exact sizes), so this program has two inputs of 8 KiB.
fn small_surface() -> Program {
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    let x = b.input("x", TensorType::surface(DType::Fp16, 64, 64));
    let w = b.input("w", TensorType::surface(DType::Fp16, 64, 64));
    let y = b.add("y", &x, &w);
    b.output(&y);
    program(Dialect::Ios18, b.finish().unwrap())
}

fn spatial_width() -> Program {
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    let x = b.input("x", TensorType::surface(DType::Fp16, 1024, 40));
    let y = b.relu("y", &x);
    b.output(&y);
    program(Dialect::Ios18, b.finish().unwrap())
}

/// `x · xᵀ` (`x: [1, 4, 128, K]`) or `xᵀ · x` (`x: [1, 4, K, 128]`): inner dimension `k`.
fn matmul(k: usize, transpose_x: bool) -> Program {
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    let xt = if transpose_x { [1, 4, k, 128] } else { [1, 4, 128, k] };
    // The input and the output are 64 KiB or more, widths multiples of 16.
    let x = b.input("x", TensorType::new(DType::Fp16, xt));
    let z = b.matmul("z", &x, &x, transpose_x, !transpose_x);
    b.output(&z);
    program(Dialect::Ios18, b.finish().unwrap())
}

/// RMSNorm's denominator: reduce_mean(x²) + ε, then `root` (`rsqrt`, `sqrt`, or `pow`).
fn rms_norm(root: &str) -> Program {
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    let x = b.input("x", big16());
    let sq = b.square("sq", &x);
    let ms = b.reduce_mean("ms", &sq, &[1], true);
    let eps = b.scalar(DType::Fp16, 1e-5);
    let den = b.add("den", &ms, &eps);
    let r = match root {
        "pow" => {
            let e = b.scalar(DType::Fp16, -0.5);
            b.pow("r", &den, &e)
        }
        op => b.op1(op, "r", vec![("x", (&den).into())]),
    };
    let y = b.mul("y", &x, &r);
    b.output(&y);
    program(Dialect::Ios18, b.finish().unwrap())
}

fn rsqrt_alone() -> Program {
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    let x = b.input("x", big16());
    let y = b.op1("rsqrt", "y", vec![("x", (&x).into())]);
    b.output(&y);
    program(Dialect::Ios18, b.finish().unwrap())
}

fn gelu() -> Program {
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    b.input("x", big16());
    b.output(&Var::new("x", big16()));
    let mut f = b.finish().unwrap();
    raw_op(&mut f, "gelu", "y", &[("x", "x")], big16());
    f.outputs = vec!["y".into()];
    program(Dialect::Ios18, f)
}

fn conv_bias() -> Program {
    let mut w = Weights::new();
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    let x = b.input("x", TensorType::surface(DType::Fp16, 256, 128));
    let wv = b.constant("w", w.add_tensor("w", &[256, 256, 1, 1], &vec![0.0; 256 * 256]));
    let bias = b.constant("bias", w.add_tensor("bias", &[256], &[0.0; 256]));
    let y = b.op1("conv", "y", vec![("x", (&x).into()), ("weight", (&wv).into()), ("bias", (&bias).into())]);
    b.output(&y);
    program(Dialect::Ios18, b.finish().unwrap())
}

fn blob_chain(n: usize) -> Program {
    let mut w = Weights::new();
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    let mut h = b.input("x", TensorType::surface(DType::Fp16, 64, 512));
    for i in 0..n {
        let wv = b.constant(&format!("w{i}"), w.add_tensor(&format!("w{i}"), &[64, 64, 1, 1], &[0.0; 64 * 64]));
        h = b.conv1x1(&format!("h{i}"), &h, &wv);
    }
    b.output(&h);
    program(Dialect::Ios18, b.finish().unwrap())
}

fn blob_several_chunks() -> Program {
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    let x = b.input("x", TensorType::surface(DType::Fp16, 64, 512));
    let path = "@model_path/weights/both.bin".to_string();
    let offsets = chunk_offsets(&[64 * 64, 64 * 64]);
    let ty = TensorType::new(DType::Fp16, [64, 64, 1, 1]);
    let w0 = b.constant("w0", Value::Blob { ty: ty.clone(), path: path.clone(), offset: offsets[0] });
    let w1 = b.constant("w1", Value::Blob { ty, path, offset: offsets[1] });
    let h = b.conv1x1("h", &x, &w0);
    let y = b.conv1x1("y", &h, &w1);
    b.output(&y);
    program(Dialect::Ios18, b.finish().unwrap())
}

/// Each rule with a program that triggers it and nothing else (but `several-inputs` or
/// `several-outputs`, which programs about several surfaces cannot avoid: see
/// [`companions`]).
fn cases() -> Vec<(&'static str, Program)> {
    vec![
        ("cast-in-ios16", cast_in_ios16()),
        ("fp32-io-in-ios16", fp32_io_in_ios16()),
        ("io-dtype", io_dtype()),
        ("sdpa-attn-mask", sdpa(true)),
        ("sdpa", sdpa(false)),
        ("dimension-too-large", dimension_too_large()),
        ("concat", concat()),
        ("several-inputs", several_inputs()),
        ("several-outputs", several_outputs()),
        ("rank", rank()),
        ("padding", padding()),
        ("unequal-surface-sizes", unequal_surface_sizes()),
        ("small-surface", small_surface()),
        ("spatial-width", spatial_width()),
        ("matmul-inner-dim", matmul(48, false)),
        ("sqrt-after-reduction", rms_norm("rsqrt")),
        ("rsqrt", rsqrt_alone()),
        ("gelu", gelu()),
        ("conv-bias", conv_bias()),
        ("too-many-blob-tensors", blob_chain(17)),
        ("blob-several-chunks", blob_several_chunks()),
    ]
}

/// The rules a case's program triggers besides its own: the several-surface rules for
/// programs that need several surfaces to show their rule, and `rank` for a conv bias.
fn companions(rule: &str) -> &'static [&'static str] {
    match rule {
        "sdpa-attn-mask" | "sdpa" | "small-surface" => &["several-inputs"],
        "unequal-surface-sizes" => &["several-inputs", "several-outputs"],
        // `conv`'s bias is rank 1 by the op's definition.
        "conv-bias" => &["rank"],
        _ => &[],
    }
}

#[test]
fn each_rule_has_a_program_that_triggers_exactly_it() {
    for (rule, p) in cases() {
        let found = rules_of(&p);
        let mut want = BTreeSet::from([rule]);
        want.extend(companions(rule));
        assert_eq!(found, want, "program for `{rule}`: {:#?}", lint::lint(&p));
        for f in lint::lint(&p).iter().filter(|f| f.rule == rule) {
            assert_eq!(f.severity, lint::rule(rule).severity, "{f}");
        }
    }
}

#[test]
fn every_rule_is_exercised() {
    let exercised: BTreeSet<&str> = cases().iter().map(|(r, _)| *r).collect();
    let all: BTreeSet<&str> = RULES.iter().map(|r| r.name).collect();
    assert_eq!(exercised, all);
    // Names are unique and every reason is one line.
    assert_eq!(all.len(), RULES.len());
    assert!(RULES.iter().all(|r| !r.reason.is_empty() && !r.reason.contains('\n')));
}

/// What a real kernel looks like: fp32 I/O cast to fp16 inside (ios18), a 1×1 conv with
/// a one-file BLOBFILE weight, RMSNorm through `pow(-0.5)`, a matmul with inner dim 64
/// and a softmax.
#[test]
fn a_clean_program_has_no_findings() {
    let mut w = Weights::new();
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    let x = b.input("x", TensorType::surface(DType::Fp32, 256, 64));
    let x16 = b.cast("x16", &x, DType::Fp16);
    let wv = b.constant("w", w.add_tensor("w", &[256, 256, 1, 1], &vec![0.01; 256 * 256]));
    let h = b.conv1x1("h", &x16, &wv);
    let sq = b.square("sq", &h);
    let ms = b.reduce_mean("ms", &sq, &[1], true);
    let eps = b.scalar(DType::Fp16, 1e-5);
    let den = b.add("den", &ms, &eps);
    let e = b.scalar(DType::Fp16, -0.5);
    let r = b.pow("r", &den, &e);
    let n = b.mul("n", &h, &r);
    // [1, 256, 1, 64] → [1, 4, 64, 64]; scores = n nᵀ over an inner dim of 64.
    let heads = b.reshape("heads", &n, &[1, 4, 64, 64]);
    let scores = b.matmul("scores", &heads, &heads, false, true);
    let p = b.softmax("p", &scores, -1);
    let back = b.reshape("back", &p, &[1, 256, 1, 64]);
    let y = b.cast("y", &back, DType::Fp32);
    b.output(&y);
    let program = Program::new(Dialect::Ios18, b.finish().unwrap());
    mil::validate(&program).unwrap();
    assert_eq!(lint::lint(&program), vec![]);
}

#[test]
fn findings_name_the_op_and_say_why() {
    let findings = lint::lint(&cast_in_ios16());
    assert_eq!(findings.len(), 1);
    assert_eq!(findings[0].op.as_deref(), Some("y"));
    assert_eq!(findings[0].severity, Severity::Error);
    assert_eq!(findings[0].to_string(), "error[cast-in-ios16]: op `y`: `cast` in an ios16 program: M1/M2 reject it");

    // Spans from text are printed as line:column.
    let findings = lint::lint(&gelu());
    assert_eq!(findings[0].span.line, 7);
    assert!(findings[0].to_string().starts_with("warning[gelu] 7:9: op `y`: "), "{}", findings[0]);
}

#[test]
fn surface_findings_name_the_value_and_its_size() {
    let only = |p: &Program, rule: &str| -> Vec<lint::Finding> {
        lint::lint(p).into_iter().filter(|f| f.rule == rule).collect()
    };
    let findings = only(&small_surface(), "small-surface");
    let messages: Vec<&str> = findings.iter().map(|f| f.message.as_str()).collect();
    assert_eq!(findings.len(), 3, "{messages:?}");
    assert!(messages[0].starts_with("input `x` (tensor<fp16, [1, 64, 1, 64]>) is 8192 bytes"), "{messages:?}");
    assert!(messages[2].starts_with("output `y`"), "{messages:?}");
    assert!(findings.iter().all(|f| f.op.is_none()));

    let findings = only(&unequal_surface_sizes(), "unequal-surface-sizes");
    assert_eq!(findings.len(), 2);
    assert!(findings[0].message.contains("`a` 65536 B, `c` 131072 B"), "{}", findings[0].message);
    assert!(findings[0].message.contains("padded to 131072 bytes"), "{}", findings[0].message);
}

#[test]
fn matmul_inner_dim_follows_the_transposes() {
    assert!(rules_of(&matmul(64, false)).is_empty());
    assert_eq!(rules_of(&matmul(48, true)), BTreeSet::from(["matmul-inner-dim"]));
    assert!(rules_of(&matmul(64, true)).is_empty());
    let f = &lint::lint(&matmul(48, true))[0];
    assert_eq!(f.op.as_deref(), Some("z"));
    assert_eq!(f.message, "inner dimension 48 is not a multiple of 32");
}

#[test]
fn roots_of_reductions_are_told_apart_from_other_roots() {
    // sqrt after the reduction is flagged; the pow(-0.5) form is what the rule asks for.
    let sqrt = lint::lint(&rms_norm("sqrt"));
    assert_eq!(sqrt.len(), 1);
    assert_eq!(sqrt[0].rule, "sqrt-after-reduction");
    assert_eq!(sqrt[0].message, "`sqrt` of the reduction `ms`: use pow(x, 0.5)");
    assert!(lint::lint(&rms_norm("pow")).is_empty());
    // rsqrt of the reduction is one finding, not two.
    let rsqrt = lint::lint(&rms_norm("rsqrt"));
    assert_eq!(rsqrt.len(), 1, "{rsqrt:?}");
}

#[test]
fn sixteen_blob_tensors_are_fine_seventeen_are_not() {
    assert!(lint::lint(&blob_chain(16)).is_empty());
    let f = lint::lint(&blob_chain(17));
    assert_eq!(f.len(), 1);
    assert!(f[0].message.starts_with("the program has 17 BLOBFILE constants"), "{}", f[0].message);
}

#[test]
fn only_the_second_chunk_of_a_shared_file_is_flagged() {
    let f = lint::lint(&blob_several_chunks());
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].op.as_deref(), Some("w1"));
    assert!(f[0].message.contains("offset 8320"), "{}", f[0].message);
}

#[test]
fn ios16_rules_do_not_fire_on_ios18() {
    let p = cast_in_ios16().to_dialect(Dialect::Ios18);
    assert!(lint::lint(&p).is_empty());
    let p = fp32_io_in_ios16().to_dialect(Dialect::Ios18);
    assert!(lint::lint(&p).is_empty());
}

#[test]
fn the_several_surface_and_padding_findings_say_what_and_how_much() {
    let f = lint::lint(&several_inputs());
    assert_eq!(f[0].message, "2 inputs (`x`, `w`): the seed's working programs have one, with the rest packed into it");
    let f = lint::lint(&padding());
    assert!(f[0].message.contains("read up to position 64 of 192: 128 positions of padding"), "{}", f[0].message);
    let f = lint::lint(&rank());
    assert_eq!(f.iter().map(|f| f.op.as_deref()).collect::<Vec<_>>(), vec![Some("m"), Some("r")]);
    // Padding within the spatial multiple's rounding is not padding worth a finding.
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    let x = b.input("x", TensorType::surface(DType::Fp16, 512, 96));
    let s = b.slice_by_size("s", &x, &[0, 0, 0, 0], &[1, 512, 1, 40]);
    let y = b.relu("y", &s);
    let z = b.reshape("z", &y, &[1, 512, 1, 40]);
    b.output(&z);
    let p = program(Dialect::Ios18, b.finish().unwrap());
    assert!(!rules_of(&p).contains("padding"), "{:#?}", lint::lint(&p));
    // Concatenating results on the channel axis is the packed convention's output.
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    let x = b.input("x", big16());
    let y = b.relu("y", &x);
    let z = b.concat("z", &[&x, &y], 1);
    b.output(&z);
    assert!(lint::lint(&program(Dialect::Ios18, b.finish().unwrap())).is_empty());
}

#[test]
fn has_errors_sees_errors_only() {
    assert!(lint::has_errors(&lint::lint(&sdpa(true))));
    assert!(!lint::has_errors(&lint::lint(&sdpa(false))));
    assert!(!lint::has_errors(&lint::lint(&concat())));
}

/// docs/ANE.md mirrors `RULES` row for row; this keeps the two from drifting apart.
#[test]
fn docs_ane_md_mirrors_the_rules() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/ANE.md");
    let doc = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    for r in RULES {
        let row = format!("| `{}` | {} | {} |", r.name, r.severity, r.reason);
        assert!(doc.contains(&row), "docs/ANE.md lacks the row\n{row}");
    }
    let rows =
        doc.lines().filter(|l| l.starts_with("| `") && (l.contains(" | error | ") || l.contains(" | warning | ")));
    assert_eq!(rows.count(), RULES.len(), "docs/ANE.md lists rules that RULES does not have");
}
