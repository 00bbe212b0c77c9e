//! Every MIL op on the CPU device against a naive f64 reference, on seeded random
//! inputs, in fp32 and in fp16-rounding mode.
//!
//! Tolerances (see `common::Tol`): in fp32 mode a few units of f32 roundoff for
//! elementwise ops (the vectorised `exp` is within 2 ulp, and sigmoid/SiLU add a
//! division and a multiply), and the standard `n·u·Σ|terms|` bound for sums of `n`
//! terms; in fp16 mode one rounding to fp16 (relative 2⁻¹¹, taken as 2⁻¹⁰) on top, since
//! each op rounds its result exactly once. Ops that only move data are exact.

mod common;

use common::*;
use device::Precision;
use mil::{Arg, DType, Value};

fn ints(v: &[i64]) -> Arg {
    Arg::Value(Value::int32s(v))
}

fn int(v: i64) -> Arg {
    Arg::Value(Value::int32(v))
}

fn boolean(v: bool) -> Arg {
    Arg::Value(Value::bool(v))
}

fn bools(v: &[bool]) -> Arg {
    Arg::Value(Value::Literal { ty: mil::TensorType::new(DType::Bool, [v.len()]), data: mil::Data::Bool(v.to_vec()) })
}

fn string(s: &str) -> Arg {
    Arg::Value(Value::string(s))
}

// ---------------------------------------------------------------- reference ops

fn ref_binary(x: &Tensor, y: &Tensor, out_shape: &[usize], f: impl Fn(f64, f64) -> f64) -> Tensor {
    let data = (0..numel(out_shape))
        .map(|i| {
            let idx = unravel(i, out_shape);
            f(x.at_broadcast(&idx), y.at_broadcast(&idx))
        })
        .collect();
    Tensor::new(out_shape, data)
}

fn ref_softmax(x: &Tensor, axis: usize) -> Tensor {
    let mut out = x.clone();
    for i in 0..x.data.len() {
        let idx = unravel(i, &x.shape);
        let mut m = f64::NEG_INFINITY;
        for k in 0..x.shape[axis] {
            let mut j = idx.clone();
            j[axis] = k;
            m = m.max(x.at(&j));
        }
        let mut s = 0.0;
        for k in 0..x.shape[axis] {
            let mut j = idx.clone();
            j[axis] = k;
            s += (x.at(&j) - m).exp();
        }
        out.data[i] = (x.data[i] - m).exp() / s;
    }
    out
}

/// Reduces over `axes` with `f` starting from `init`; returns the kept-dims shape
/// (keep_dims = true) result.
fn ref_reduce(x: &Tensor, axes: &[usize], init: f64, f: impl Fn(f64, f64) -> f64) -> Tensor {
    let shape: Vec<usize> = x.shape.iter().enumerate().map(|(d, &n)| if axes.contains(&d) { 1 } else { n }).collect();
    let mut out = Tensor::new(&shape, vec![init; numel(&shape)]);
    for i in 0..x.data.len() {
        let mut idx = unravel(i, &x.shape);
        for &a in axes {
            idx[a] = 0;
        }
        let o = ravel(&idx, &shape);
        out.data[o] = f(out.data[o], x.data[i]);
    }
    out
}

fn ref_matmul(x: &Tensor, y: &Tensor, tx: bool, ty: bool) -> Tensor {
    let t2 = |t: &Tensor, tr: bool| -> Tensor {
        if !tr {
            return t.clone();
        }
        let r = t.shape.len();
        let mut perm: Vec<usize> = (0..r).collect();
        perm.swap(r - 2, r - 1);
        ref_transpose(t, &perm)
    };
    let (x, y) = (t2(x, tx), t2(y, ty));
    let (rx, ry) = (x.shape.len(), y.shape.len());
    let (m, k, n) = (x.shape[rx - 2], x.shape[rx - 1], y.shape[ry - 1]);
    let bx = &x.shape[..rx - 2];
    let by = &y.shape[..ry - 2];
    let rank = bx.len().max(by.len());
    let batch: Vec<usize> = (0..rank)
        .map(|d| {
            let a = if d + bx.len() >= rank { bx[d + bx.len() - rank] } else { 1 };
            let b = if d + by.len() >= rank { by[d + by.len() - rank] } else { 1 };
            a.max(b)
        })
        .collect();
    let mut shape = batch.clone();
    shape.extend([m, n]);
    let mut out = Tensor::new(&shape, vec![0.0; numel(&shape)]);
    for i in 0..out.data.len() {
        let idx = unravel(i, &shape);
        let (bi, row, col) = (&idx[..rank], idx[rank], idx[rank + 1]);
        let mut s = 0.0;
        for kk in 0..k {
            let mut xi: Vec<usize> = bi.to_vec();
            xi.extend([row, kk]);
            let mut yi: Vec<usize> = bi.to_vec();
            yi.extend([kk, col]);
            s += x.at_broadcast(&xi) * y.at_broadcast(&yi);
        }
        out.data[i] = s;
    }
    out
}

fn ref_transpose(x: &Tensor, perm: &[usize]) -> Tensor {
    let shape: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
    let data = (0..x.data.len())
        .map(|i| {
            let oi = unravel(i, &shape);
            let mut xi = vec![0; perm.len()];
            for (d, &p) in perm.iter().enumerate() {
                xi[p] = oi[d];
            }
            x.at(&xi)
        })
        .collect();
    Tensor::new(&shape, data)
}

struct ConvRef {
    strides: [usize; 2],
    dilations: [usize; 2],
    pad: [usize; 4],
    groups: usize,
}

fn ref_conv(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, g: &ConvRef) -> Tensor {
    let [n, c, h, wd] = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
    let [o, cg, kh, kw] = [w.shape[0], w.shape[1], w.shape[2], w.shape[3]];
    let ho = (h + g.pad[0] + g.pad[1] - ((kh - 1) * g.dilations[0] + 1)) / g.strides[0] + 1;
    let wo = (wd + g.pad[2] + g.pad[3] - ((kw - 1) * g.dilations[1] + 1)) / g.strides[1] + 1;
    assert_eq!(c, cg * g.groups);
    let og = o / g.groups;
    let shape = [n, o, ho, wo];
    let mut out = Tensor::new(&shape, vec![0.0; numel(&shape)]);
    for i in 0..out.data.len() {
        let [b, oc, y, xx] = <[usize; 4]>::try_from(unravel(i, &shape)).unwrap();
        let grp = oc / og;
        let mut s = bias.map_or(0.0, |bt| bt.data[oc]);
        for ci in 0..cg {
            for ky in 0..kh {
                for kx in 0..kw {
                    let iy = (y * g.strides[0] + ky * g.dilations[0]) as i64 - g.pad[0] as i64;
                    let ix = (xx * g.strides[1] + kx * g.dilations[1]) as i64 - g.pad[2] as i64;
                    if iy < 0 || ix < 0 || iy >= h as i64 || ix >= wd as i64 {
                        continue;
                    }
                    s += x.at(&[b, grp * cg + ci, iy as usize, ix as usize]) * w.at(&[oc, ci, ky, kx]);
                }
            }
        }
        out.data[i] = s;
    }
    out
}

/// Python's `slice(begin, end, step).indices(d)`, listed, with `None` for a masked end.
fn py_slice(d: usize, begin: Option<i64>, end: Option<i64>, step: i64) -> Vec<usize> {
    let d = d as i64;
    let norm = |v: i64| if v < 0 { v + d } else { v };
    let mut out = Vec::new();
    if step > 0 {
        let start = begin.map_or(0, |b| norm(b).clamp(0, d));
        let stop = end.map_or(d, |e| norm(e).clamp(0, d));
        let mut i = start;
        while i < stop {
            out.push(i as usize);
            i += step;
        }
    } else {
        let start = begin.map_or(d - 1, |b| norm(b).clamp(-1, d - 1));
        let stop = end.map_or(-1, |e| norm(e).clamp(-1, d - 1));
        let mut i = start;
        while i > stop {
            out.push(i as usize);
            i += step;
        }
    }
    out
}

/// `x` indexed by one list of positions per axis.
fn ref_take(x: &Tensor, per_axis: &[Vec<usize>]) -> Tensor {
    let shape: Vec<usize> = per_axis.iter().map(Vec::len).collect();
    let data = (0..numel(&shape))
        .map(|i| {
            let oi = unravel(i, &shape);
            let xi: Vec<usize> = oi.iter().enumerate().map(|(d, &k)| per_axis[d][k]).collect();
            x.at(&xi)
        })
        .collect();
    Tensor::new(&shape, data)
}

fn ref_concat(values: &[&Tensor], axis: usize, interleave: bool) -> Tensor {
    let mut shape = values[0].shape.clone();
    shape[axis] = values.iter().map(|v| v.shape[axis]).sum();
    let data = (0..numel(&shape))
        .map(|i| {
            let mut idx = unravel(i, &shape);
            let k = idx[axis];
            if interleave {
                let n = values.len();
                idx[axis] = k / n;
                values[k % n].at(&idx)
            } else {
                let mut at = k;
                for v in values {
                    if at < v.shape[axis] {
                        idx[axis] = at;
                        return v.at(&idx);
                    }
                    at -= v.shape[axis];
                }
                unreachable!()
            }
        })
        .collect();
    Tensor::new(&shape, data)
}

// ---------------------------------------------------------------- elementwise

fn binary_case(p: Precision, op: &str, seed: u64, positive: bool, f: fn(f64, f64) -> f64, ulps: f64) {
    let (lo, hi) = if positive { (0.25, 3.0) } else { (-3.0, 3.0) };
    // [2, 3, 4, 5] ⊕ [3, 1, 5]: broadcast on a middle axis and a leading one.
    let mut c = Case::new(p, seed);
    let (x, xt) = c.input("x", &[2, 3, 4, 5], lo, hi);
    let (y, yt) = c.input("y", &[3, 1, 5], lo, hi);
    // And against a scalar constant on the left, and a per-channel constant.
    let s = c.scalar(1.5);
    let cht = c.random(&[1, 3, 1, 1], lo, hi);
    let ch = c.constant("ch", &cht);
    let z1 = c.b.op1(op, "z1", vec![("x", (&x).into()), ("y", (&y).into())]);
    let z2 = c.b.op1(op, "z2", vec![("x", (&s).into()), ("y", (&x).into())]);
    let z3 = c.b.op1(op, "z3", vec![("x", (&y).into()), ("y", (&ch).into())]);
    let got = c.run(&[&z1, &z2, &z3]);
    let tol = Tol::one_op(p, ulps);
    let st = Tensor::new(&[], vec![1.5]);
    assert_close(&format!("{op} x,y"), &got[0], &ref_binary(&xt, &yt, &[2, 3, 4, 5], f), None, tol);
    assert_close(&format!("{op} scalar,x"), &got[1], &ref_binary(&st, &xt, &[2, 3, 4, 5], f), None, tol);
    assert_close(&format!("{op} y,ch"), &got[2], &ref_binary(&yt, &cht, &[1, 3, 1, 5], f), None, tol);
}

both_precisions! {
    add => |p| binary_case(p, "add", 1, false, |a, b| a + b, 1.0);
    sub => |p| binary_case(p, "sub", 2, false, |a, b| a - b, 1.0);
    mul => |p| binary_case(p, "mul", 3, false, |a, b| a * b, 1.0);
    real_div => |p| binary_case(p, "real_div", 4, true, |a, b| a / b, 1.0);
    pow => |p| binary_case(p, "pow", 5, true, f64::powf, 4.0);
    maximum => |p| binary_case(p, "maximum", 6, false, f64::max, 0.0);
    minimum => |p| binary_case(p, "minimum", 7, false, f64::min, 0.0);
}

fn unary_case(p: Precision, op: &str, seed: u64, range: (f64, f64), f: impl Fn(f64) -> f64, ulps: f64) {
    let mut c = Case::new(p, seed);
    // A big input exercises the parallel path; a transposed view, the strided one.
    let (x, xt) = c.input("x", &[1, 64, 1, 700], range.0, range.1);
    let (s, st) = c.input("s", &[3, 5], range.0, range.1);
    let y = c.b.op1(op, "y", vec![("x", (&x).into())]);
    let t = c.b.transpose("t", &s, &[1, 0]);
    let z = c.b.op1(op, "z", vec![("x", (&t).into())]);
    let got = c.run(&[&y, &z]);
    let tol = Tol::one_op(p, ulps);
    assert_close(op, &got[0], &xt.map(&f), None, tol);
    assert_close(&format!("{op} on a transposed view"), &got[1], &ref_transpose(&st, &[1, 0]).map(&f), None, tol);
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

both_precisions! {
    sqrt => |p| unary_case(p, "sqrt", 11, (0.0, 4.0), f64::sqrt, 1.0);
    exp => |p| unary_case(p, "exp", 12, (-8.0, 8.0), f64::exp, 3.0);
    relu => |p| unary_case(p, "relu", 13, (-2.0, 2.0), |x| x.max(0.0), 0.0);
    sigmoid => |p| unary_case(p, "sigmoid", 14, (-10.0, 10.0), sigmoid, 6.0);
    silu => |p| unary_case(p, "silu", 15, (-10.0, 10.0), |x| x * sigmoid(x), 8.0);
    tanh => |p| unary_case(p, "tanh", 16, (-4.0, 4.0), f64::tanh, 4.0);
    identity => |p| unary_case(p, "identity", 17, (-2.0, 2.0), |x| x, 0.0);
    square => |p| unary_case(p, "square", 18, (-2.0, 2.0), |x| x * x, 1.0);
    abs => |p| unary_case(p, "abs", 19, (-2.0, 2.0), f64::abs, 0.0);
}

/// The ops with an `epsilon`: default (coremltools': rsqrt 1e-12, log 1e-45, inverse
/// 1e-4, in x's dtype) and given.
fn epsilon_case(p: Precision, op: &str, seed: u64, default: f64, f: fn(f64, f64) -> f64) {
    let mut c = Case::new(p, seed);
    let (x, xt) = c.input("x", &[4, 50], 0.01, 4.0);
    let eps = c.scalar(0.125);
    let y = c.b.op1(op, "y", vec![("x", (&x).into())]);
    let z = c.b.op1(op, "z", vec![("x", (&x).into()), ("epsilon", (&eps).into())]);
    let got = c.run(&[&y, &z]);
    // The default is a value of x's dtype: in fp16 programs 1e-12 and 1e-45 are 0.
    let default = c_fit(p, default);
    let mut tol = Tol::one_op(p, 3.0);
    if op == "log" {
        // ln near 1 turns the rounding of x + ε (relative 2⁻²⁴) into that much absolute
        // error: the function's conditioning, not the implementation's.
        tol.abs += 2.0 * U32;
    }
    assert_close(&format!("{op} default epsilon"), &got[0], &xt.map(|x| f(x, default)), None, tol);
    assert_close(&format!("{op} epsilon 0.125"), &got[1], &xt.map(|x| f(x, 0.125)), None, tol);
}

fn c_fit(p: Precision, x: f64) -> f64 {
    match p {
        Precision::Fp32 => x as f32 as f64,
        Precision::Fp16 => r16(x),
    }
}

both_precisions! {
    rsqrt => |p| epsilon_case(p, "rsqrt", 21, 1e-12, |x, e| 1.0 / (x + e).sqrt());
    log => |p| epsilon_case(p, "log", 22, 1e-45, |x, e| (x + e).ln());
    inverse => |p| epsilon_case(p, "inverse", 23, 1e-4, |x, e| 1.0 / (x + e));
}

#[test]
fn log_of_zero_uses_the_default_epsilon() {
    // fp32: log(0 + 1e-45) = ln(1.4e-45) (the subnormal nearest 1e-45), finite.
    let mut c = Case::new(Precision::Fp32, 24);
    let (x, _) = c.input_with("x", Tensor::new(&[1, 2], vec![0.0, 1.0]));
    let y = c.b.op1("log", "y", vec![("x", (&x).into())]);
    let got = c.run(&[&y]);
    assert_close("log(0)", &got[0], &Tensor::new(&[1, 2], vec![(1e-45f32 as f64).ln(), 0.0]), None, Tol::f32(2.0));
}

both_precisions! {
    cast => |p: Precision| {
        let mut c = Case::new(p, 31);
        let (x, xt) = c.input("x", &[3, 40], -300.0, 300.0);
        let to32 = c.b.cast("to32", &x, DType::Fp32);
        let to16 = c.b.cast("to16", &to32, DType::Fp16);
        let back = c.b.cast("back", &to16, c.dtype);
        let to_int = c.b.cast("to_int", &x, DType::Int32);
        let int_back = c.b.cast("int_back", &to_int, c.dtype);
        let to_bool = c.b.cast("to_bool", &to_int, DType::Bool);
        let bool_back = c.b.cast("bool_back", &to_bool, c.dtype);
        let got = c.run(&[&back, &int_back, &bool_back]);
        // fp16 mode rounds at the cast to fp16; fp32 mode holds fp32 (and the inputs of an
        // fp16 program are fp16 numbers already).
        let want = match p {
            Precision::Fp32 => xt.clone(),
            Precision::Fp16 => xt.map(r16),
        };
        assert_close("cast fp32 → fp16 → back", &got[0], &want, None, Tol::f32(0.0));
        let trunc = xt.map(|v| c_fit(p, v.trunc()));
        assert_close("cast to int32 truncates", &got[1], &trunc, None, Tol::f32(0.0));
        let nz = xt.map(|v| if v.trunc() != 0.0 { 1.0 } else { 0.0 });
        assert_close("cast to bool", &got[2], &nz, None, Tol::f32(0.0));
    };
}

#[test]
fn cast_to_fp16_rounds_only_in_fp16_mode() {
    // An fp32 program (the ios18 pattern: fp32 I/O, cast inside) on both precisions.
    for p in [Precision::Fp32, Precision::Fp16] {
        let mut c = Case::new(Precision::Fp32, 32);
        c.precision = p;
        let v = 1.0 + 1.0 / 4096.0; // between two fp16 numbers
        let (x, _) = c.input_with("x", Tensor::new(&[1, 1], vec![v]));
        let h = c.b.cast("h", &x, DType::Fp16);
        let y = c.b.cast("y", &h, DType::Fp32);
        let got = c.run(&[&y]);
        let want = if p == Precision::Fp16 { r16(v) } else { v };
        assert_eq!(got[0].data[0], want, "{p:?}");
    }
}

// ---------------------------------------------------------------- softmax, reductions

fn softmax_case(p: Precision, shape: &[usize], axis: i64, seed: u64) {
    let mut c = Case::new(p, seed);
    let (x, xt) = c.input("x", shape, -6.0, 6.0);
    let y = c.b.softmax("y", &x, axis);
    let got = c.run(&[&y]);
    let a = if axis < 0 { (axis + shape.len() as i64) as usize } else { axis as usize };
    // exp within 3 ulp, a sum of `len` terms, one division.
    let tol = Tol::one_op(p, 8.0 + 2.0 * shape[a] as f64);
    assert_close(&format!("softmax {shape:?} axis {axis}"), &got[0], &ref_softmax(&xt, a), None, tol);
}

both_precisions! {
    softmax_last_axis => |p| softmax_case(p, &[2, 3, 67], -1, 41);
    softmax_big_rows => |p| softmax_case(p, &[4, 64, 256], -1, 42);
    softmax_middle_axis => |p| softmax_case(p, &[2, 9, 150], 1, 43);
    softmax_channels => |p| softmax_case(p, &[1, 24, 1, 40], 1, 44);
}

fn reduce_case(p: Precision, op: &str, shape: &[usize], axes: Option<&[i64]>, keep: bool, seed: u64) {
    let mut c = Case::new(p, seed);
    let (x, xt) = c.input("x", shape, -2.0, 2.0);
    let mut args = vec![("x", (&x).into()), ("keep_dims", boolean(keep))];
    if let Some(a) = axes {
        args.push(("axes", ints(a)));
    }
    let y = c.b.op1(op, "y", args);
    let got = c.run(&[&y]);
    let rank = shape.len() as i64;
    let ax: Vec<usize> = match axes {
        Some(a) => a.iter().map(|&v| if v < 0 { v + rank } else { v } as usize).collect(),
        None => (0..shape.len()).collect(),
    };
    let count: usize = ax.iter().map(|&a| shape[a]).product();
    let (want, mag) = match op {
        "reduce_max" => (ref_reduce(&xt, &ax, f64::NEG_INFINITY, f64::max), None),
        _ => {
            let s = ref_reduce(&xt, &ax, 0.0, |a, b| a + b);
            let m = ref_reduce(&xt.abs(), &ax, 0.0, |a, b| a + b);
            if op == "reduce_mean" {
                (s.map(|v| v / count as f64), Some(m.map(|v| v / count as f64)))
            } else {
                (s, Some(m))
            }
        }
    };
    let mut want = want;
    let mut mag = mag;
    if !keep {
        let shape: Vec<usize> =
            want.shape.iter().enumerate().filter(|(d, _)| !ax.contains(d)).map(|(_, &n)| n).collect();
        want.shape = shape.clone();
        if let Some(m) = mag.as_mut() {
            m.shape = shape;
        }
    }
    let tol = if op == "reduce_max" { Tol::one_op(p, 0.0) } else { Tol::dot(p, count) };
    assert_close(&format!("{op} {shape:?} axes {axes:?} keep {keep}"), &got[0], &want, mag.as_ref(), tol);
}

both_precisions! {
    reduce_sum_channels => |p| reduce_case(p, "reduce_sum", &[1, 48, 1, 33], Some(&[1]), true, 51);
    reduce_sum_last => |p| reduce_case(p, "reduce_sum", &[3, 4, 40], Some(&[-1]), false, 52);
    reduce_sum_two_axes => |p| reduce_case(p, "reduce_sum", &[3, 4, 5, 6], Some(&[0, 2]), false, 53);
    reduce_sum_all => |p| reduce_case(p, "reduce_sum", &[3, 4, 5], None, false, 54);
    reduce_mean_channels => |p| reduce_case(p, "reduce_mean", &[1, 768, 1, 64], Some(&[1]), true, 55);
    reduce_mean_last => |p| reduce_case(p, "reduce_mean", &[64, 300], Some(&[1]), true, 56);
    reduce_max_channels => |p| reduce_case(p, "reduce_max", &[1, 48, 1, 33], Some(&[1]), true, 57);
    reduce_max_last => |p| reduce_case(p, "reduce_max", &[5, 3, 41], Some(&[-1]), false, 58);
    reduce_max_all => |p| reduce_case(p, "reduce_max", &[2, 3, 4], None, true, 59);
}

// ---------------------------------------------------------------- matmul, conv

fn matmul_case(p: Precision, xs: &[usize], ys: &[usize], tx: bool, ty: bool, seed: u64) {
    let mut c = Case::new(p, seed);
    let (x, xt) = c.input("x", xs, -1.0, 1.0);
    let (y, yt) = c.input("y", ys, -1.0, 1.0);
    let z = c.b.matmul("z", &x, &y, tx, ty);
    let got = c.run(&[&z]);
    let want = ref_matmul(&xt, &yt, tx, ty);
    let mag = ref_matmul(&xt.abs(), &yt.abs(), tx, ty);
    let k = if tx { xs[xs.len() - 2] } else { xs[xs.len() - 1] };
    let what = format!("matmul {xs:?}·{ys:?} tx {tx} ty {ty}");
    assert_close(&what, &got[0], &want, Some(&mag), Tol::dot(p, k));
}

both_precisions! {
    matmul_plain => |p| matmul_case(p, &[5, 7], &[7, 3], false, false, 61);
    matmul_transpose_x => |p| matmul_case(p, &[7, 5], &[7, 3], true, false, 62);
    matmul_transpose_y => |p| matmul_case(p, &[5, 7], &[3, 7], false, true, 63);
    matmul_transpose_both => |p| matmul_case(p, &[64, 96], &[80, 64], true, true, 64);
    matmul_batch_broadcast => |p| matmul_case(p, &[2, 1, 4, 6], &[3, 6, 5], false, false, 65);
    matmul_heads => |p| matmul_case(p, &[1, 4, 32, 16], &[1, 4, 32, 16], false, true, 66);
    matmul_large => |p| matmul_case(p, &[192, 160], &[160, 130], false, false, 67);
}

struct ConvCase<'a> {
    x: [usize; 4],
    w: [usize; 4],
    args: Vec<(&'a str, Arg)>,
    geometry: ConvRef,
    bias: bool,
}

fn conv_case(p: Precision, case: ConvCase<'_>, seed: u64) {
    let mut c = Case::new(p, seed);
    let (x, xt) = c.input("x", &case.x, -1.0, 1.0);
    let wt = c.random(&case.w, -1.0, 1.0);
    let w = c.constant("w", &wt);
    let mut args = vec![("x", (&x).into()), ("weight", (&w).into())];
    let bt = c.random(&[case.w[0]], -1.0, 1.0);
    if case.bias {
        let b = c.constant("b", &bt);
        args.push(("bias", (&b).into()));
    }
    args.extend(case.args);
    let y = c.b.op1("conv", "y", args);
    let got = c.run(&[&y]);
    let bias = case.bias.then_some(&bt);
    let want = ref_conv(&xt, &wt, bias, &case.geometry);
    let mag = ref_conv(&xt.abs(), &wt.abs(), bias.map(|b| b.abs()).as_ref(), &case.geometry);
    let terms = case.w[1] * case.w[2] * case.w[3] + 1;
    assert_close("conv", &got[0], &want, Some(&mag), Tol::dot(p, terms));
}

fn geometry(strides: [usize; 2], dilations: [usize; 2], pad: [usize; 4], groups: usize) -> ConvRef {
    ConvRef { strides, dilations, pad, groups }
}

both_precisions! {
    conv_pointwise => |p| conv_case(p, ConvCase {
        x: [1, 48, 1, 40], w: [24, 48, 1, 1],
        args: vec![("pad_type", string("valid"))],
        geometry: geometry([1, 1], [1, 1], [0; 4], 1), bias: false,
    }, 71);
    conv_pointwise_bias_batch => |p| conv_case(p, ConvCase {
        x: [2, 16, 3, 5], w: [8, 16, 1, 1],
        args: vec![],
        geometry: geometry([1, 1], [1, 1], [0; 4], 1), bias: true,
    }, 72);
    conv_3x3_same => |p| conv_case(p, ConvCase {
        x: [1, 4, 7, 9], w: [6, 4, 3, 3],
        args: vec![("pad_type", string("same"))],
        geometry: geometry([1, 1], [1, 1], [1, 1, 1, 1], 1), bias: true,
    }, 73);
    conv_strided_valid => |p| conv_case(p, ConvCase {
        x: [2, 3, 9, 8], w: [5, 3, 3, 2],
        args: vec![("pad_type", string("valid")), ("strides", ints(&[2, 3]))],
        geometry: geometry([2, 3], [1, 1], [0; 4], 1), bias: false,
    }, 74);
    conv_dilated_custom_pad => |p| conv_case(p, ConvCase {
        x: [1, 2, 8, 8], w: [3, 2, 3, 3],
        args: vec![("pad_type", string("custom")), ("pad", ints(&[2, 1, 0, 3])), ("dilations", ints(&[2, 1]))],
        geometry: geometry([1, 1], [2, 1], [2, 1, 0, 3], 1), bias: true,
    }, 75);
    conv_groups => |p| conv_case(p, ConvCase {
        x: [1, 8, 5, 6], w: [6, 4, 3, 1],
        args: vec![("groups", int(2)), ("pad_type", string("same"))],
        geometry: geometry([1, 1], [1, 1], [1, 1, 0, 0], 2), bias: true,
    }, 76);
    conv_pointwise_groups => |p| conv_case(p, ConvCase {
        x: [1, 6, 1, 10], w: [9, 2, 1, 1],
        args: vec![("groups", int(3))],
        geometry: geometry([1, 1], [1, 1], [0; 4], 3), bias: false,
    }, 77);
}

// ---------------------------------------------------------------- data movement

fn reshaped(t: &Tensor, shape: &[usize]) -> Tensor {
    Tensor::new(shape, t.data.clone())
}

both_precisions! {
    reshape_transpose => |p: Precision| {
        let mut c = Case::new(p, 81);
        let (x, xt) = c.input("x", &[2, 3, 4, 5], -1.0, 1.0);
        let r = c.b.reshape("r", &x, &[0, -1, 10]); // 0 keeps dim 0: [2, 6, 10]
        let t = c.b.transpose("t", &x, &[3, 1, 0, 2]);
        // A reshape of a transposed view needs a copy; it must still be right.
        let tr = c.b.reshape("tr", &t, &[5, 24]);
        // A reshape that splits an axis of the transposed view does not.
        let ts = c.b.reshape("ts", &t, &[5, 3, 2, 2, 2]);
        let got = c.run(&[&r, &t, &tr, &ts]);
        let tt = ref_transpose(&xt, &[3, 1, 0, 2]);
        assert_eq!(got[0], reshaped(&xt, &[2, 6, 10]), "reshape");
        assert_eq!(got[1], tt, "transpose");
        assert_eq!(got[2], reshaped(&tt, &[5, 24]), "reshape of a transpose");
        assert_eq!(got[3], reshaped(&tt, &[5, 3, 2, 2, 2]), "split axes of a transpose");
    };

    expand_squeeze => |p: Precision| {
        let mut c = Case::new(p, 82);
        let (x, xt) = c.input("x", &[3, 1, 4], -1.0, 1.0);
        let e = c.b.op1("expand_dims", "e", vec![("x", (&x).into()), ("axes", ints(&[0, -1]))]);
        let s = c.b.op1("squeeze", "s", vec![("x", (&x).into()), ("axes", ints(&[1]))]);
        let s_all = c.b.op1("squeeze", "s_all", vec![("x", (&e).into())]);
        let got = c.run(&[&e, &s, &s_all]);
        assert_eq!(got[0], reshaped(&xt, &[1, 3, 1, 4, 1]), "expand_dims");
        assert_eq!(got[1], reshaped(&xt, &[3, 4]), "squeeze axis 1");
        assert_eq!(got[2], reshaped(&xt, &[3, 4]), "squeeze all");
    };

    slice_by_size => |p: Precision| {
        let mut c = Case::new(p, 83);
        let (x, xt) = c.input("x", &[1, 6, 1, 20], -1.0, 1.0);
        let a = c.b.slice_by_size("a", &x, &[0, 2, 0, 5], &[1, 3, 1, 10]);
        let b = c.b.slice_by_size("b", &x, &[0, -2, 0, 0], &[-1, -1, 1, 7]);
        let got = c.run(&[&a, &b]);
        let r = |lo: usize, n: usize| (lo..lo + n).collect::<Vec<_>>();
        assert_eq!(got[0], ref_take(&xt, &[r(0, 1), r(2, 3), r(0, 1), r(5, 10)]), "slice_by_size");
        assert_eq!(got[1], ref_take(&xt, &[r(0, 1), r(4, 2), r(0, 1), r(0, 7)]), "negative begin, size -1");
    };

    slice_by_index => |p: Precision| {
        let mut c = Case::new(p, 84);
        let (x, xt) = c.input("x", &[5, 6, 7], -1.0, 1.0);
        // x[1:5:2, ::-1, -2:1:-3] with begin/end masks on axis 1.
        let a = c.b.op1("slice_by_index", "a", vec![
            ("x", (&x).into()),
            ("begin", ints(&[1, 0, -2])),
            ("end", ints(&[5, 0, 1])),
            ("stride", ints(&[2, -1, -3])),
            ("begin_mask", bools(&[false, true, false])),
            ("end_mask", bools(&[false, true, false])),
        ]);
        // x[3, 1:4, :] with axis 0 squeezed.
        let b = c.b.op1("slice_by_index", "b", vec![
            ("x", (&x).into()),
            ("begin", ints(&[3, 1, 0])),
            ("end", ints(&[4, 4, 7])),
            ("squeeze_mask", bools(&[true, false, false])),
        ]);
        let got = c.run(&[&a, &b]);
        let want_a = ref_take(&xt, &[py_slice(5, Some(1), Some(5), 2), py_slice(6, None, None, -1), py_slice(7, Some(-2), Some(1), -3)]);
        assert_eq!(got[0], want_a, "strided and reversed slice");
        let want_b = ref_take(&xt, &[vec![3], vec![1, 2, 3], (0..7).collect()]);
        assert_eq!(got[1], reshaped(&want_b, &[3, 7]), "squeezed slice");
    };

    concat => |p: Precision| {
        let mut c = Case::new(p, 85);
        let (x, xt) = c.input("x", &[2, 3, 4], -1.0, 1.0);
        let (y, yt) = c.input("y", &[2, 5, 4], -1.0, 1.0);
        let (z, zt) = c.input("z", &[2, 3, 4], -1.0, 1.0);
        let t = c.b.transpose("t", &z, &[0, 1, 2]);
        let cat = c.b.concat("cat", &[&x, &y, &t], 1);
        let il = c.b.op1("concat", "il", vec![
            ("values", Arg::List(vec![(&x).into(), (&z).into()])),
            ("axis", int(-1)),
            ("interleave", boolean(true)),
        ]);
        let got = c.run(&[&cat, &il]);
        assert_eq!(got[0], ref_concat(&[&xt, &yt, &zt], 1, false), "concat");
        assert_eq!(got[1], ref_concat(&[&xt, &zt], 2, true), "interleaved concat");
    };

    split => |p: Precision| {
        let mut c = Case::new(p, 86);
        let (x, xt) = c.input("x", &[1, 10, 1, 6], -1.0, 1.0);
        let parts = c.b.split("s", &x, &[3, 5, 2], 1);
        let halves = c.b.op("split", "h", vec![("x", (&x).into()), ("axis", int(-1)), ("num_splits", int(2))]);
        let mut outs: Vec<&mil::Var> = parts.iter().collect();
        outs.extend(halves.iter());
        let got = c.run(&outs);
        let r = |lo: usize, n: usize| (lo..lo + n).collect::<Vec<_>>();
        assert_eq!(got[0], ref_take(&xt, &[r(0, 1), r(0, 3), r(0, 1), r(0, 6)]));
        assert_eq!(got[1], ref_take(&xt, &[r(0, 1), r(3, 5), r(0, 1), r(0, 6)]));
        assert_eq!(got[2], ref_take(&xt, &[r(0, 1), r(8, 2), r(0, 1), r(0, 6)]));
        assert_eq!(got[3], ref_take(&xt, &[r(0, 1), r(0, 10), r(0, 1), r(0, 3)]));
        assert_eq!(got[4], ref_take(&xt, &[r(0, 1), r(0, 10), r(0, 1), r(3, 3)]));
    };

    gather => |p: Precision| {
        let mut c = Case::new(p, 87);
        let (x, xt) = c.input("x", &[6, 4, 3], -1.0, 1.0);
        // Constant int indices on axis 0 (with a negative one), float indices from an
        // input on axis 1.
        let idx = c.b.constant("idx", Value::Literal {
            ty: mil::TensorType::new(DType::Int32, [2, 2]),
            data: mil::Data::Int(vec![5, 0, -1, 2]),
        });
        let (fi, _) = c.input_with("fi", Tensor::new(&[3], vec![3.0, 0.0, 3.0]));
        let a = c.b.gather("a", &x, &idx, 0);
        let b = c.b.gather("b", &x, &fi, 1);
        let got = c.run(&[&a, &b]);
        let rows = [5usize, 0, 5, 2];
        let xd = &xt.data;
        let want_a = Tensor::new(&[2, 2, 4, 3], rows.iter().flat_map(|&r| xd[r * 12..r * 12 + 12].to_vec()).collect());
        assert_eq!(got[0], want_a, "gather axis 0");
        assert_eq!(got[1], ref_take(&xt, &[(0..6).collect(), vec![3, 0, 3], (0..3).collect()]), "gather axis 1");
    };
}

/// Compute ops reading strided, reversed and broadcast views (no copy in between) agree
/// with the reference on the same data materialised.
fn views_feed_compute(p: Precision) {
    let mut c = Case::new(p, 88);
    let (x, xt) = c.input("x", &[6, 8], -2.0, 2.0);
    // r = x[::-1, 1::2]: reversed rows, every other column: [6, 4].
    let r = c.b.op1(
        "slice_by_index",
        "r",
        vec![
            ("x", (&x).into()),
            ("begin", ints(&[0, 1])),
            ("end", ints(&[0, 8])),
            ("stride", ints(&[-1, 2])),
            ("begin_mask", bools(&[true, false])),
            ("end_mask", bools(&[true, false])),
        ],
    );
    let t = c.b.transpose("t", &r, &[1, 0]); // [4, 6]
    let sm = c.b.softmax("sm", &t, -1);
    let rs = c.b.reduce_sum("rs", &t, &[0], false);
    let mm = c.b.matmul("mm", &t, &r, false, false); // [4, 6]·[6, 4]
    let ex = c.b.exp("ex", &t);
    let got = c.run(&[&sm, &rs, &mm, &ex]);
    let rt = ref_take(&xt, &[py_slice(6, None, None, -1), py_slice(8, Some(1), Some(8), 2)]);
    let tt = ref_transpose(&rt, &[1, 0]);
    assert_close("softmax of a view", &got[0], &ref_softmax(&tt, 1), None, Tol::one_op(p, 20.0));
    let sum = ref_reduce(&tt, &[0], 0.0, |a, b| a + b);
    let mag = ref_reduce(&tt.abs(), &[0], 0.0, |a, b| a + b);
    assert_close("reduce of a view", &got[1], &reshaped(&sum, &[6]), Some(&reshaped(&mag, &[6])), Tol::dot(p, 4));
    let mm_want = ref_matmul(&tt, &rt, false, false);
    let mm_mag = ref_matmul(&tt.abs(), &rt.abs(), false, false);
    assert_close("matmul of views", &got[2], &mm_want, Some(&mm_mag), Tol::dot(p, 6));
    assert_close("exp of a view", &got[3], &tt.map(f64::exp), None, Tol::one_op(p, 3.0));
}

both_precisions! {
    views_feed_compute_ops => views_feed_compute;
}
