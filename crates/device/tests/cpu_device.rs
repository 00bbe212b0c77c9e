//! The CPU device as a device: the dynamic-weight view path, weights baked at compile
//! time, the compile budget, binding and evaluation errors, dialects.

mod common;

use common::*;
use device::cpu::{CpuDevice, ANE_COMPILE_BUDGET};
use device::{Device, ErrorKind, Precision, Surface, Weights};
use mil::builder::FunctionBuilder;
use mil::{DType, Dialect, Program, TensorType, Value};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn relu_program(dtype: DType, dialect: Dialect) -> Program {
    let mut b = FunctionBuilder::new("main", dialect);
    let x = b.input("x", TensorType::surface(dtype, 4, 8));
    let y = b.relu("y", &x);
    b.output(&y);
    Program::new(dialect, b.finish().unwrap())
}

fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

/// The dynamic-weight layer: x and Wᵀ packed in one surface `[1, IC, 1, S + OC]`, the
/// weights sliced, reshaped to `[IC, OC]`, transposed to `[OC, IC]`, multiplied. All of
/// it is views on the input; the result must equal the same product computed from
/// separately packed operands (which the device materialises nowhere either, but which
/// takes the plain path), and the naive reference.
fn view_path(p: Precision) {
    let (ic, oc, s) = (48, 40, 24);
    let dtype = if p == Precision::Fp16 { DType::Fp16 } else { DType::Fp32 };
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    let xw = b.input("xw", TensorType::surface(dtype, ic, s + oc));
    let x = b.slice_by_size("x", &xw, &[0, 0, 0, 0], &[1, ic as i64, 1, s as i64]);
    let x = b.reshape("x2", &x, &[ic as i64, s as i64]);
    let w = b.slice_by_size("w", &xw, &[0, 0, 0, s as i64], &[1, ic as i64, 1, oc as i64]);
    let w = b.reshape("w2", &w, &[ic as i64, oc as i64]);
    let wt = b.transpose("wt", &w, &[1, 0]); // [OC, IC]
    let y = b.matmul("y", &wt, &x, false, false); // [OC, S]
    let y = b.reshape("out", &y, &[1, oc as i64, 1, s as i64]);
    b.output(&y);
    let packed = Program::new(Dialect::Ios18, b.finish().unwrap());

    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    let wm = b.input("w", TensorType::new(dtype, [oc, ic]));
    let xm = b.input("x", TensorType::new(dtype, [ic, s]));
    let y = b.matmul("y", &wm, &xm, false, false);
    b.output(&y);
    let plain = Program::new(Dialect::Ios18, b.finish().unwrap());

    let mut rng = ChaCha8Rng::seed_from_u64(91);
    let xv = random(&mut rng, ic * s);
    let wv = random(&mut rng, ic * oc); // stored [IC, OC]
    let device = CpuDevice::new(p);
    let mut surface = Surface::activation(dtype, ic, s + oc);
    surface.write_block(0, 0, ic, s, &xv);
    surface.write_block(0, s, ic, oc, &wv);
    let mut out = Surface::activation(dtype, oc, s);
    device.compile(&packed, &Weights::new()).unwrap().eval(&[&surface], &mut [&mut out]).unwrap();

    // The same operands, packed separately: W as [OC, IC], x as [IC, S], as the
    // surface holds them (rounded to its dtype).
    let mut held_w = vec![0.0; ic * oc];
    surface.read_block(0, s, ic, oc, &mut held_w);
    let mut held_x = vec![0.0; ic * s];
    surface.read_block(0, 0, ic, s, &mut held_x);
    let w_oc_ic: Vec<f32> = (0..oc * ic).map(|i| held_w[(i % ic) * oc + i / ic]).collect();
    let ws = Surface::from_f32(dtype, &[oc, ic], &w_oc_ic);
    let xs = Surface::from_f32(dtype, &[ic, s], &held_x);
    let mut out_plain = Surface::zeros(dtype, &[oc, s]);
    device.compile(&plain, &Weights::new()).unwrap().eval(&[&ws, &xs], &mut [&mut out_plain]).unwrap();
    assert_eq!(out.to_f32(), out_plain.to_f32(), "view path and packed operands agree exactly");

    let got = Tensor::new(&[oc, s], out.to_f32().iter().map(|&v| v as f64).collect());
    let mut want = Tensor::new(&[oc, s], vec![0.0; oc * s]);
    let mut mag = want.clone();
    for o in 0..oc {
        for j in 0..s {
            for k in 0..ic {
                let (a, b) = (held_w[k * oc + o] as f64, held_x[k * s + j] as f64);
                want.data[o * s + j] += a * b;
                mag.data[o * s + j] += (a * b).abs();
            }
        }
    }
    assert_close("dynamic-weight matmul", &got, &want, Some(&mag), Tol::dot(p, ic));
}

both_precisions! {
    dynamic_weight_views => view_path;
}

/// Weights are read at compile time: changing them afterwards changes nothing; a new
/// compile sees the new ones.
#[test]
fn weights_are_baked_at_compile() {
    let mut weights = Weights::new();
    let w = weights.add_tensor("w", &[2, 3, 1, 1], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let mut b = FunctionBuilder::new("main", Dialect::Ios16);
    let x = b.input("x", TensorType::surface(DType::Fp16, 3, 1));
    let w = b.constant("w", w);
    let y = b.conv1x1("y", &x, &w);
    b.output(&y);
    let program = Program::new(Dialect::Ios16, b.finish().unwrap());
    let device = CpuDevice::new(Precision::Fp16);
    let mut kernel = device.compile(&program, &weights).unwrap();
    let input = Surface::from_f32(DType::Fp16, &[1, 3, 1, 1], &[1.0, 1.0, 1.0]);
    let mut out = Surface::zeros(DType::Fp16, &[1, 2, 1, 1]);
    kernel.eval(&[&input], &mut [&mut out]).unwrap();
    assert_eq!(out.to_f32(), vec![6.0, 15.0]);

    // Rewrite the weight file in place: the compiled kernel does not notice.
    weights.add_tensor("w", &[2, 3, 1, 1], &[0.0; 6]);
    kernel.eval(&[&input], &mut [&mut out]).unwrap();
    assert_eq!(out.to_f32(), vec![6.0, 15.0]);
    drop(weights);
    kernel.eval(&[&input], &mut [&mut out]).unwrap();
    assert_eq!(out.to_f32(), vec![6.0, 15.0]);

    let mut new_weights = Weights::new();
    new_weights.add_tensor("w", &[2, 3, 1, 1], &[1.0, 0.0, 0.0, 0.0, 0.0, 2.0]);
    let mut recompiled = device.compile(&program, &new_weights).unwrap();
    recompiled.eval(&[&input], &mut [&mut out]).unwrap();
    assert_eq!(out.to_f32(), vec![1.0, 2.0]);
}

#[test]
fn missing_weight_file_is_a_program_error() {
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    let x = b.input("x", TensorType::surface(DType::Fp16, 3, 1));
    let w = b.constant(
        "w",
        Value::Blob {
            ty: TensorType::new(DType::Fp16, [2, 3, 1, 1]),
            path: "@model_path/weights/nowhere.bin".into(),
            offset: 64,
        },
    );
    let y = b.conv1x1("y", &x, &w);
    b.output(&y);
    let program = Program::new(Dialect::Ios18, b.finish().unwrap());
    let err = CpuDevice::new(Precision::Fp32).compile(&program, &Weights::new()).err().expect("no weights");
    assert_eq!(err.kind, ErrorKind::Program);
    assert!(err.message.contains("nowhere.bin"), "{}", err.message);
}

#[test]
fn invalid_programs_are_program_errors_and_cost_no_budget() {
    let mut program = relu_program(DType::Fp32, Dialect::Ios18);
    // Declare the relu's result with the wrong shape.
    program.functions[0].ops[0].outputs[0].ty.shape = vec![1, 4, 1, 9];
    let device = CpuDevice::new(Precision::Fp32).with_compile_limit(1);
    let err = device.compile(&program, &Weights::new()).err().expect("invalid");
    assert_eq!(err.kind, ErrorKind::Program);
    assert!(err.message.contains("`y`"), "{}", err.message);
    assert_eq!(device.compiles_left(), Some(1));
    assert_eq!(device.compiles_done(), 0);
}

#[test]
fn compile_budget_is_shared_by_clones_and_then_refuses() {
    assert_eq!(ANE_COMPILE_BUDGET, 119);
    let program = relu_program(DType::Fp32, Dialect::Ios18);
    let device = CpuDevice::new(Precision::Fp32).with_compile_limit(3);
    let clone = device.clone();
    assert_eq!(device.compiles_left(), Some(3));
    device.compile(&program, &Weights::new()).unwrap();
    clone.compile(&program, &Weights::new()).unwrap();
    assert_eq!(device.compiles_left(), Some(1));
    assert_eq!(clone.compiles_done(), 2);
    device.compile(&program, &Weights::new()).unwrap();
    assert_eq!(device.compiles_left(), Some(0));
    let err = clone.compile(&program, &Weights::new()).err().expect("budget spent");
    assert_eq!(err.kind, ErrorKind::CompileBudget);
    assert!(err.message.contains("3 of 3") && err.message.contains("restart"), "{}", err.message);
    assert_eq!(device.compiles_done(), 3, "a refused compile is not counted");

    // A device without a limit has no budget, but counts.
    let free = CpuDevice::new(Precision::Fp32);
    assert_eq!(free.compiles_left(), None);
    free.compile(&program, &Weights::new()).unwrap();
    assert_eq!(free.compiles_done(), 1);
}

#[test]
fn binding_mistakes_are_errors_not_panics() {
    let device = CpuDevice::new(Precision::Fp32);
    let mut kernel = device.compile(&relu_program(DType::Fp32, Dialect::Ios18), &Weights::new()).unwrap();
    let good = Surface::activation(DType::Fp32, 4, 8);
    let mut out = Surface::activation(DType::Fp32, 4, 8);
    kernel.eval(&[&good], &mut [&mut out]).unwrap();

    let wrong_shape = Surface::activation(DType::Fp32, 4, 9);
    let wrong_dtype = Surface::activation(DType::Fp16, 4, 8);
    let cases: Vec<(&str, Vec<&Surface>)> = vec![
        ("no input", vec![]),
        ("two inputs", vec![&good, &good]),
        ("shape", vec![&wrong_shape]),
        ("dtype", vec![&wrong_dtype]),
    ];
    for (what, inputs) in cases {
        let err = kernel.eval(&inputs, &mut [&mut out]).err().unwrap_or_else(|| panic!("{what}: accepted"));
        assert_eq!(err.kind, ErrorKind::Binding, "{what}");
        assert!(!err.message.is_empty());
    }
    let mut bad_out = Surface::activation(DType::Fp16, 4, 8);
    let err = kernel.eval(&[&good], &mut [&mut bad_out]).expect_err("fp16 output for fp32");
    assert_eq!(err.kind, ErrorKind::Binding);
    assert!(err.message.contains("output `y`"), "{}", err.message);
    let err = kernel.eval(&[&good], &mut []).expect_err("no output");
    assert_eq!(err.kind, ErrorKind::Binding);
    // And the kernel still works afterwards.
    kernel.eval(&[&good], &mut [&mut out]).unwrap();
}

fn gather_program(dtype: DType) -> Program {
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    let table = b.input("table", TensorType::new(dtype, [5, 3]));
    let idx = b.input("idx", TensorType::new(dtype, [2]));
    let y = b.gather("y", &table, &idx, 0);
    b.output(&y);
    Program::new(Dialect::Ios18, b.finish().unwrap())
}

#[test]
fn bad_gather_indices_are_eval_errors() {
    for p in [Precision::Fp32, Precision::Fp16] {
        let dtype = if p == Precision::Fp16 { DType::Fp16 } else { DType::Fp32 };
        let mut kernel = CpuDevice::new(p).compile(&gather_program(dtype), &Weights::new()).unwrap();
        let table = Surface::from_f32(dtype, &[5, 3], &(0..15).map(|v| v as f32).collect::<Vec<_>>());
        let mut out = Surface::zeros(dtype, &[2, 3]);
        let ok = Surface::from_f32(dtype, &[2], &[4.0, -5.0]);
        kernel.eval(&[&table, &ok], &mut [&mut out]).unwrap();
        assert_eq!(out.to_f32(), vec![12.0, 13.0, 14.0, 0.0, 1.0, 2.0]);
        for bad in [[1.0, 5.0], [-6.0, 0.0], [1.5, 0.0]] {
            let idx = Surface::from_f32(dtype, &[2], &bad);
            let err = kernel.eval(&[&table, &idx], &mut [&mut out]).expect_err("bad index");
            assert_eq!(err.kind, ErrorKind::Eval, "{bad:?}");
            assert!(err.message.contains("op `y`") && err.message.contains("size 5"), "{}", err.message);
        }
    }
    // A constant int index out of range passes validation and fails at eval.
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    let table = b.input("table", TensorType::new(DType::Fp32, [5, 3]));
    let idx = b.constant("idx", Value::int32s(&[7]));
    let y = b.gather("y", &table, &idx, 0);
    b.output(&y);
    let program = Program::new(Dialect::Ios18, b.finish().unwrap());
    let mut kernel = CpuDevice::new(Precision::Fp32).compile(&program, &Weights::new()).unwrap();
    let t = Surface::zeros(DType::Fp32, &[5, 3]);
    let mut out = Surface::zeros(DType::Fp32, &[1, 3]);
    assert_eq!(kernel.eval(&[&t], &mut [&mut out]).err().unwrap().kind, ErrorKind::Eval);
}

#[test]
fn dialects() {
    let device = CpuDevice::new(Precision::Fp16);
    assert_eq!(device.dialect(), Dialect::Ios18);
    assert_eq!(device.clone().with_dialect(Dialect::Ios16).dialect(), Dialect::Ios16);
    assert_eq!(device.name(), "cpu");
    assert_eq!(device.precision(), Precision::Fp16);
    // An ios16 program (fp16 I/O, no cast) and an ios18 one (fp32 I/O) both run.
    for (dtype, dialect) in [(DType::Fp16, Dialect::Ios16), (DType::Fp32, Dialect::Ios18)] {
        let mut kernel = device.compile(&relu_program(dtype, dialect), &Weights::new()).unwrap();
        let x = Surface::from_f32(dtype, &[1, 4, 1, 8], &(0..32).map(|i| i as f32 - 16.0).collect::<Vec<_>>());
        let mut y = Surface::activation(dtype, 4, 8);
        kernel.eval(&[&x], &mut [&mut y]).unwrap();
        assert_eq!(y.to_f32(), (0..32).map(|i| (i as f32 - 16.0).max(0.0)).collect::<Vec<_>>());
    }
}

/// A kernel used twice gives the same answer (the arena is reused, not reset), and two
/// outputs that share storage (one a view of the other) are both right.
#[test]
fn repeated_evals_and_aliased_outputs() {
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    let x = b.input("x", TensorType::surface(DType::Fp32, 6, 10));
    let e = b.exp("e", &x);
    let s = b.reduce_sum("s", &e, &[1], true);
    let y = b.real_div("y", &e, &s); // a softmax over channels, by hand
    let r = b.reshape("r", &y, &[6, 10]);
    b.output(&y);
    b.output(&r);
    b.output(&x);
    let program = Program::new(Dialect::Ios18, b.finish().unwrap());
    let mut kernel = CpuDevice::new(Precision::Fp32).compile(&program, &Weights::new()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(92);
    for _ in 0..3 {
        let xv = random(&mut rng, 60);
        let xs = Surface::from_f32(DType::Fp32, &[1, 6, 1, 10], &xv);
        let mut y = Surface::activation(DType::Fp32, 6, 10);
        let mut r = Surface::zeros(DType::Fp32, &[6, 10]);
        let mut xo = Surface::activation(DType::Fp32, 6, 10);
        kernel.eval(&[&xs], &mut [&mut y, &mut r, &mut xo]).unwrap();
        assert_eq!(y.to_f32(), r.to_f32());
        assert_eq!(xo.to_f32(), xv);
        for j in 0..10 {
            let sum: f64 = (0..6).map(|c| (xv[c * 10 + j] as f64).exp()).sum();
            for c in 0..6 {
                let want = (xv[c * 10 + j] as f64).exp() / sum;
                assert!((y.to_f32()[c * 10 + j] as f64 - want).abs() < 1e-6);
            }
        }
    }
}
