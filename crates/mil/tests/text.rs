//! The printer and the parser against hand-written MIL text, and against each other on
//! random programs in both dialects.

use mil::blob::Weights;
use mil::builder::FunctionBuilder;
use mil::ir::Data;
use mil::text::{parse, parse_and_validate, print};
use mil::{Arg, DType, Dialect, Function, Program, Span, TensorType, Value, Var};
use proptest::prelude::*;

/// A comparison stricter than `==`: every f64 by its shortest round-trip spelling (so
/// `-0.0` differs from `0.0` and NaN equals NaN), spans ignored.
fn strict(p: &Program) -> String {
    let mut p = p.clone();
    for f in &mut p.functions {
        f.span = Span::default();
        for op in &mut f.ops {
            op.span = Span::default();
        }
    }
    format!("{p:?}")
}

/// DESIGN.md's tiny example, byte for byte.
const DESIGN_EXAMPLE: &str = r#"program(1.3)
[buildInfo = dict<string, string>({{"coremlc-version", "3505.4.1"}})]
{
    func main<ios18>(tensor<fp16, [1, 64, 1, 32]> x) {
        fp16 two = const()[name = string("two"), val = fp16(2)];
        tensor<fp16, [1, 64, 1, 32]> y = mul(x = x, y = two)[name = string("y")];
    } -> (y);
}
"#;

fn design_example_program(dialect: Dialect) -> Program {
    let mut b = FunctionBuilder::new("main", dialect);
    let x = b.input("x", TensorType::surface(DType::Fp16, 64, 32));
    let two = b.constant("two", Value::float(DType::Fp16, 2.0));
    let y = b.mul("y", &x, &two);
    b.output(&y);
    let mut p = Program::new(dialect, b.finish().unwrap());
    p.build_info = vec![("coremlc-version".into(), "3505.4.1".into())];
    p
}

#[test]
fn prints_the_design_example_byte_for_byte() {
    let p = design_example_program(Dialect::Ios18);
    assert_eq!(print(&p), DESIGN_EXAMPLE);
    let parsed = parse_and_validate(DESIGN_EXAMPLE).unwrap();
    assert_eq!(strict(&parsed), strict(&p));
    let f = parsed.main().unwrap();
    assert_eq!((f.span.line, f.span.col), (4, 5));
    assert_eq!((f.ops[1].span.line, f.ops[1].span.col), (6, 9));
}

#[test]
fn prints_the_ios16_dialect() {
    let mut p = design_example_program(Dialect::Ios16);
    p.build_info = vec![("coremlc-version".into(), "3304.6.2".into())];
    let expected = r#"program(1.0)
[buildInfo = dict<tensor<string, []>, tensor<string, []>>({{"coremlc-version", "3304.6.2"}})]
{
    func main<ios16>(tensor<fp16, [1, 64, 1, 32]> x) {
        tensor<fp16, []> two = const()[name = tensor<string, []>("two"), val = tensor<fp16, []>(2)];
        tensor<fp16, [1, 64, 1, 32]> y = mul(x = x, y = two)[name = tensor<string, []>("y")];
    } -> (y);
}
"#;
    assert_eq!(print(&p), expected);
    assert_eq!(strict(&parse_and_validate(expected).unwrap()), strict(&p));
}

#[test]
fn prints_literals_blobs_tuples_and_multiple_results() {
    let mut weights = Weights::new();
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    let x = b.input("x", TensorType::surface(DType::Fp16, 4, 2));
    let w = b.constant("w", weights.add_tensor("w", &[4, 4, 1, 1], &[0.0; 16]));
    let y = b.conv1x1("y", &x, &w);
    let m = b.constant("m", Value::floats(TensorType::new(DType::Fp16, [2, 2]), vec![1.0, -0.5, 1e-7, 0.0]));
    let parts = b.split("s", &y, &[1, 3], 1);
    let c = b.concat("c", &[&parts[1], &parts[0]], 1);
    b.output(&c);
    b.output(&m);
    let ios18 = Program::new(Dialect::Ios18, b.finish().unwrap());
    let text = print(&ios18);
    for line in [
        r#"        tensor<fp16, [4, 4, 1, 1]> w = const()[name = string("w"), val = tensor<fp16, [4, 4, 1, 1]>(BLOBFILE(path = string("@model_path/weights/w.bin"), offset = uint64(64)))];"#,
        r#"        string c_1 = const()[name = string("c_1"), val = string("valid")];"#,
        r#"        tensor<int32, [4]> c_3 = const()[name = string("c_3"), val = tensor<int32, [4]>([0, 0, 0, 0])];"#,
        r#"        int32 c_4 = const()[name = string("c_4"), val = int32(1)];"#,
        r#"        tensor<fp16, [2, 2]> m = const()[name = string("m"), val = tensor<fp16, [2, 2]>([[1, -0.5], [1e-7, 0]])];"#,
        r#"        tensor<fp16, [1, 1, 1, 2]> s_0, tensor<fp16, [1, 3, 1, 2]> s_1 = split(axis = c_4, num_splits = c_6, split_sizes = c_5, x = y)[name = string("s")];"#,
        r#"        bool c_7 = const()[name = string("c_7"), val = bool(false)];"#,
        r#"        tensor<fp16, [1, 4, 1, 2]> c = concat(axis = c_4, interleave = c_7, values = (s_1, s_0))[name = string("c")];"#,
        "    } -> (c, m);",
    ] {
        assert!(text.lines().any(|l| l == line), "missing line\n{line}\nin\n{text}");
    }
    let ios16 = print(&ios18.to_dialect(Dialect::Ios16));
    for line in [
        r#"        tensor<fp16, [4, 4, 1, 1]> w = const()[name = tensor<string, []>("w"), val = tensor<fp16, [4, 4, 1, 1]>(BLOBFILE(path = tensor<string, []>("@model_path/weights/w.bin"), offset = tensor<uint64, []>(64)))];"#,
        r#"        tensor<bool, []> c_7 = const()[name = tensor<string, []>("c_7"), val = tensor<bool, []>(false)];"#,
        r#"        tensor<int32, [4]> c_3 = const()[name = tensor<string, []>("c_3"), val = tensor<int32, [4]>([0, 0, 0, 0])];"#,
    ] {
        assert!(ios16.lines().any(|l| l == line), "missing line\n{line}\nin\n{ios16}");
    }
    for text in [text, ios16] {
        let p = parse_and_validate(&text).unwrap();
        assert_eq!(strict(&p.to_dialect(Dialect::Ios18)), strict(&ios18));
    }
}

#[test]
fn reads_the_lenient_forms() {
    // Either scalar form in either dialect, parenthesised results, an op without a
    // name attribute, `name` after other attributes, hex floats, comments, odd spacing.
    let text = r#"
        // a comment before the program
        program(1.0)
        {
          func main<ios16>(tensor<fp32,[1,4,1,2]>x){
            fp32 k=const()[val=fp32(0x1.8p+1),name=string("kk")];   // short form in ios16
            tensor<fp32, []> h = const()[name = tensor<string, []>("h"), val = tensor<fp32, []>(-0.5)];
            tensor<int32, [2]> sizes = const()[name = string("sizes"), val = tensor<int32, [2]>([1, 3])];
            int32 axis = const()[name = string("axis"), val = int32(1)];
            (tensor<fp32, [1, 1, 1, 2]> a, tensor<fp32, [1, 3, 1, 2]> b) = split(x = x, split_sizes = sizes, axis = axis);
            tensor<fp32, [1, 1, 1, 2]> y = mul(x = a,
                                               y = k)
                [name = string("y")];
          } -> (y, b);
        }"#;
    let p = parse_and_validate(text).unwrap();
    assert_eq!(p.dialect, Dialect::Ios16);
    assert!(p.build_info.is_empty());
    let f = p.main().unwrap();
    assert_eq!(f.ops[0].name, "kk");
    assert_eq!(f.ops[0].const_value(), Some(&Value::float(DType::Fp32, 3.0)));
    assert_eq!(f.ops[4].name, "a", "an op without `name` is named after its first result");
    assert_eq!(f.ops[4].outputs.len(), 2);
    assert_eq!((f.ops[5].span.line, f.ops[5].span.col), (11, 13));
    // Printing canonicalises, and the canonical text reads back to the same program.
    assert_eq!(strict(&parse(&print(&p)).unwrap()), strict(&p));
}

#[test]
fn special_floats_and_strings_round_trip() {
    // The extremes an fp32 literal can hold (a finite literal past f32::MAX is an error,
    // tests/malformed.rs), and f64's subnormals, which read back exactly as written.
    let max = f32::MAX as f64;
    let floats = vec![-0.0, 0.0, 5e-324, 2.2250738585072014e-308, max, -max, f64::INFINITY, f64::NEG_INFINITY];
    let mut floats_nan = floats.clone();
    floats_nan.push(f64::NAN);
    let strings = ["", "a\"b", "back\\slash", "line\nbreak\ttab\r", "ünïcødé ✓", "\"\\\""];
    for dialect in [Dialect::Ios18, Dialect::Ios16] {
        let mut b = FunctionBuilder::new("main", dialect);
        let x = b.input("x", TensorType::surface(DType::Fp32, 1, 1));
        b.constant("f", Value::floats(TensorType::new(DType::Fp32, [floats_nan.len()]), floats_nan.clone()));
        for (i, s) in strings.iter().enumerate() {
            b.constant(&format!("s{i}"), Value::string(*s));
        }
        b.constant("u", Value::uint64(u64::MAX));
        b.constant("i", Value::int32s(&[i32::MIN as i64, i32::MAX as i64]));
        let y = b.identity("y", &x);
        b.output(&y);
        let mut p = Program::new(dialect, b.finish().unwrap());
        p.build_info.push(("quote\"d".into(), "\\".into()));
        let q = parse_and_validate(&print(&p)).unwrap();
        assert_eq!(strict(&q), strict(&p));
        let Some(Value::Literal { data: Data::Float(v), .. }) = q.main().unwrap().ops[0].const_value() else {
            panic!("`f` is a float literal")
        };
        assert_eq!(v[0].to_bits(), (-0.0f64).to_bits(), "negative zero keeps its sign");
        assert!(v.last().unwrap().is_nan());
    }
}

// ---- random programs ----

/// Floats that are hard to print: every class of f64 plus the ones that matter here.
fn any_float() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>(),
        Just(-0.0),
        Just(5e-324),
        Just(f64::MAX),
        Just(-1e300),
        Just(65504.0),
        Just(6e-8),
        Just(f64::NAN),
        Just(f64::NEG_INFINITY),
        (-1e3..1e3f64),
    ]
}

/// `x`, or the largest finite value of `dtype` with its sign where `x` is finite but
/// beyond it: such a literal would become infinity, which the parser refuses.
fn in_range(x: f64, dtype: DType) -> f64 {
    let max = if dtype == DType::Fp16 { 65504.0 } else { f32::MAX as f64 };
    if x.is_finite() && x.abs() > max {
        max.copysign(x)
    } else {
        x
    }
}

fn any_string() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[\"\\\\a-z \n]{0,8}"]
}

/// A literal of any dtype and a small shape, with data of the right length.
fn any_literal() -> impl Strategy<Value = Value> {
    let shape = prop::collection::vec(1usize..4, 0..3);
    (prop::sample::select(DType::ALL.to_vec()), shape).prop_flat_map(|(dtype, shape)| {
        let n: usize = shape.iter().product();
        let ty = TensorType::new(dtype, shape);
        let data = match dtype {
            DType::Fp16 | DType::Fp32 => prop::collection::vec(any_float().prop_map(move |x| in_range(x, dtype)), n)
                .prop_map(Data::Float)
                .boxed(),
            DType::Int32 => prop::collection::vec(any::<i32>().prop_map(i64::from), n).prop_map(Data::Int).boxed(),
            DType::Uint64 => prop::collection::vec(any::<u64>().prop_map(|u| u as i64), n).prop_map(Data::Int).boxed(),
            DType::Bool => prop::collection::vec(any::<bool>(), n).prop_map(Data::Bool).boxed(),
            DType::String => prop::collection::vec(any_string(), n).prop_map(Data::Str).boxed(),
        };
        data.prop_map(move |data| Value::Literal { ty: ty.clone(), data })
    })
}

/// One step of a random program: which op, and which earlier values it takes.
#[derive(Clone, Debug)]
enum Step {
    Unary(usize, usize),
    Binary(usize, usize, usize),
    ScaleInline(usize, f64),
    Softmax(usize),
    Reduce(usize, usize, usize, bool),
    Transpose(usize),
    Reshape(usize),
    Concat(usize),
    Split(usize),
    Matmul(usize),
    Conv(usize, u64),
    Literal(Value),
}

fn any_step() -> impl Strategy<Value = Step> {
    let i = || 0usize..64;
    prop_oneof![
        (i(), i()).prop_map(|(o, a)| Step::Unary(o, a)),
        (i(), i(), i()).prop_map(|(o, a, b)| Step::Binary(o, a, b)),
        (i(), any_float()).prop_map(|(a, k)| Step::ScaleInline(a, k)),
        i().prop_map(Step::Softmax),
        (i(), i(), i(), any::<bool>()).prop_map(|(o, a, ax, keep)| Step::Reduce(o, a, ax, keep)),
        i().prop_map(Step::Transpose),
        i().prop_map(Step::Reshape),
        i().prop_map(Step::Concat),
        i().prop_map(Step::Split),
        i().prop_map(Step::Matmul),
        (i(), any::<u64>()).prop_map(|(a, seed)| Step::Conv(a, seed)),
        any_literal().prop_map(Step::Literal),
    ]
}

/// Input names that are also MIL keywords or type names, to show they stay names.
const INPUT_NAMES: [&str; 8] = ["x", "tensor", "fp16", "func", "BLOBFILE", "inf", "true", "name"];

#[derive(Clone, Debug)]
struct Recipe {
    dialect: Dialect,
    dtype: DType,
    inputs: Vec<(usize, usize)>,
    steps: Vec<Step>,
    build_info: Vec<(String, String)>,
    second_function: bool,
}

fn any_recipe() -> impl Strategy<Value = Recipe> {
    (
        prop::sample::select(vec![Dialect::Ios18, Dialect::Ios16]),
        prop::sample::select(vec![DType::Fp16, DType::Fp32]),
        prop::collection::vec((1usize..6, 1usize..6), 1..4),
        prop::collection::vec(any_step(), 0..16),
        prop::collection::vec((any_string(), any_string()), 0..3),
        any::<bool>(),
    )
        .prop_map(|(dialect, dtype, inputs, steps, build_info, second_function)| Recipe {
            dialect,
            dtype,
            inputs,
            steps,
            build_info,
            second_function,
        })
}

/// Runs a recipe through the builder, skipping steps whose operands do not fit, so the
/// result always validates.
fn build_function(r: &Recipe, name: &str, weights: &mut Weights) -> Function {
    const UNARY: [&str; 8] = ["relu", "sigmoid", "silu", "tanh", "exp", "sqrt", "square", "identity"];
    const BINARY: [&str; 6] = ["add", "sub", "mul", "real_div", "maximum", "minimum"];
    let mut b = FunctionBuilder::new(name, r.dialect);
    let mut pool: Vec<Var> = r
        .inputs
        .iter()
        .enumerate()
        .map(|(i, &(c, s))| b.input(INPUT_NAMES[i], TensorType::surface(r.dtype, c, s)))
        .collect();
    for (k, step) in r.steps.iter().enumerate() {
        let out = format!("v{k}");
        let pick = |i: usize| pool[i % pool.len()].clone();
        let made: Vec<Var> = match step {
            Step::Unary(o, a) => vec![b.op1(UNARY[o % UNARY.len()], &out, vec![("x", (&pick(*a)).into())])],
            Step::Binary(o, a, c) => {
                let (x, mut y) = (pick(*a), pick(*c));
                if mil::ops::broadcast(&x.ty.shape, &y.ty.shape).is_none() {
                    y = x.clone();
                }
                vec![b.op1(BINARY[o % BINARY.len()], &out, vec![("x", (&x).into()), ("y", (&y).into())])]
            }
            Step::ScaleInline(a, k) => {
                let x = pick(*a);
                let lit = Arg::Value(Value::float(x.ty.dtype, in_range(*k, x.ty.dtype)));
                vec![b.op1("mul", &out, vec![("x", (&x).into()), ("y", lit)])]
            }
            Step::Softmax(a) => vec![b.softmax(&out, &pick(*a), -1)],
            Step::Reduce(o, a, ax, keep) => {
                let x = pick(*a);
                let axis = (ax % x.ty.rank().max(1)) as i64;
                let v = match o % 3 {
                    0 => b.reduce_sum(&out, &x, &[axis], *keep),
                    1 => b.reduce_mean(&out, &x, &[axis], *keep),
                    _ => b.reduce_max(&out, &x, &[axis], *keep),
                };
                vec![v]
            }
            Step::Transpose(a) => {
                let x = pick(*a);
                let perm: Vec<i64> = (0..x.ty.rank() as i64).rev().collect();
                vec![b.transpose(&out, &x, &perm)]
            }
            Step::Reshape(a) => {
                let x = pick(*a);
                vec![b.reshape(&out, &x, &[1, -1])]
            }
            Step::Concat(a) => {
                let x = pick(*a);
                vec![b.concat(&out, &[&x, &x], 0)]
            }
            Step::Split(a) => {
                let x = pick(*a);
                match x.ty.shape.first() {
                    Some(&d) if d > 1 => b.split(&out, &x, &[1, d as i64 - 1], 0),
                    _ => vec![],
                }
            }
            Step::Matmul(a) => {
                let x = pick(*a);
                if x.ty.rank() >= 2 {
                    vec![b.matmul(&out, &x, &x, false, true)]
                } else {
                    vec![]
                }
            }
            Step::Conv(a, seed) => {
                let x = pick(*a);
                if x.ty.rank() == 4 && x.ty.dtype == DType::Fp16 {
                    let c = x.ty.shape[1];
                    let o = 1 + (*seed as usize % 3);
                    let data: Vec<f32> = (0..o * c).map(|i| (i as f32 * 0.25) - (*seed % 7) as f32).collect();
                    let w = b.constant(
                        &format!("{out}_w"),
                        weights.add_tensor(&format!("{name}_{out}"), &[o, c, 1, 1], &data),
                    );
                    vec![b.conv1x1(&out, &x, &w)]
                } else {
                    vec![]
                }
            }
            Step::Literal(v) => {
                b.constant(&out, v.clone());
                vec![]
            }
        };
        pool.extend(made.into_iter().filter(|v| v.ty.dtype.is_float()));
    }
    let last = pool.last().unwrap().clone();
    b.output(&last);
    if pool.len() > 1 {
        let first = pool[0].clone();
        b.output(&first);
    }
    b.finish().unwrap()
}

fn build(r: &Recipe) -> Program {
    let mut weights = Weights::new();
    let mut p = Program::new(r.dialect, build_function(r, "main", &mut weights));
    if r.second_function {
        p.functions.push(build_function(r, "aux", &mut weights));
    }
    p.build_info = r.build_info.clone();
    p
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_programs_round_trip(r in any_recipe()) {
        let p = build(&r);
        mil::validate(&p).unwrap();
        let text = print(&p);
        let q = parse_and_validate(&text).unwrap();
        prop_assert_eq!(strict(&q), strict(&p));
        prop_assert_eq!(&print(&q), &text);
        // The same program in the other dialect reads back to the same ops.
        let other = match r.dialect { Dialect::Ios18 => Dialect::Ios16, Dialect::Ios16 => Dialect::Ios18 };
        let moved = p.to_dialect(other);
        let text2 = print(&moved);
        prop_assert_ne!(&text2, &text);
        let q2 = parse_and_validate(&text2).unwrap();
        prop_assert_eq!(q2.dialect, other);
        prop_assert_eq!(strict(&q2), strict(&moved));
        for (f, g) in q2.functions.iter().zip(&p.functions) {
            prop_assert_eq!(format!("{:?}", f.ops.iter().map(|o| (&o.op, &o.outputs, &o.args, &o.attrs)).collect::<Vec<_>>()),
                            format!("{:?}", g.ops.iter().map(|o| (&o.op, &o.outputs, &o.args, &o.attrs)).collect::<Vec<_>>()));
        }
    }

    #[test]
    fn random_literals_round_trip(v in any_literal(), dialect in prop::sample::select(vec![Dialect::Ios18, Dialect::Ios16])) {
        let mut b = FunctionBuilder::new("main", dialect);
        let x = b.input("x", TensorType::surface(DType::Fp16, 1, 1));
        b.constant("lit", v.clone());
        let mut f = b.finish_with_output(&x);
        // The literal also as an inline argument, which skips the const op.
        f.ops.push(mil::Operation {
            op: "identity".into(),
            name: "y".into(),
            outputs: vec![Var::new("y", v.ty().clone())],
            args: vec![("x".into(), Arg::Value(v.clone()))],
            attrs: vec![],
            span: Span::default(),
        });
        let p = Program::new(dialect, f);
        let q = parse(&print(&p)).unwrap();
        prop_assert_eq!(strict(&q), strict(&p));
    }
}

/// `finish` after declaring one output, for tests that add ops by hand afterwards.
trait FinishWithOutput {
    fn finish_with_output(self, v: &Var) -> Function;
}

impl FinishWithOutput for FunctionBuilder {
    fn finish_with_output(mut self, v: &Var) -> Function {
        self.output(v);
        self.finish().unwrap()
    }
}
