//! Test harness for the CPU device: build a one-function program, run it, and compare
//! with a naive f64 reference written here, independent of the executor (plain loops
//! over row-major multi-indices; no views, no strides, no GEMM).

#![allow(dead_code)]

use device::cpu::CpuDevice;
use device::{Device, Precision, Surface, Weights};
use half::f16;
use mil::builder::FunctionBuilder;
use mil::{DType, Dialect, Program, TensorType, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Runs a test body once per precision, as STYLE.md asks of every kernel test: fp32,
/// and fp16-rounding mode (with fp16 program types and fp16 I/O surfaces, as an ios16
/// program on the ANE).
#[macro_export]
macro_rules! both_precisions {
    ($($name:ident => $body:expr;)*) => {
        $(
            mod $name {
                #[allow(unused_imports)]
                use super::*;
                #[test]
                fn fp32() {
                    ($body)(device::Precision::Fp32)
                }
                #[test]
                fn fp16() {
                    ($body)(device::Precision::Fp16)
                }
            }
        )*
    };
}

/// Unit roundoff of f32 (2⁻²⁴): the relative error of one correctly rounded f32 op.
pub const U32: f64 = 1.0 / 16_777_216.0;
/// Relative spacing of fp16 (2⁻¹⁰); one rounding to fp16 errs by at most half of it.
pub const EPS16: f64 = 1.0 / 1024.0;
/// Smallest fp16 subnormal (2⁻²⁴): the absolute error floor of a rounding to fp16.
pub const TINY16: f64 = 1.0 / 16_777_216.0;

/// A dense row-major tensor of f64.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Multi-index of flat position `i`.
pub fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        idx[d] = i % shape[d];
        i /= shape[d];
    }
    idx
}

/// Flat position of a multi-index.
pub fn ravel(idx: &[usize], shape: &[usize]) -> usize {
    idx.iter().zip(shape).fold(0, |acc, (&i, &d)| acc * d + i)
}

impl Tensor {
    pub fn new(shape: &[usize], data: Vec<f64>) -> Tensor {
        assert_eq!(numel(shape), data.len());
        Tensor { shape: shape.to_vec(), data }
    }

    pub fn at(&self, idx: &[usize]) -> f64 {
        self.data[ravel(idx, &self.shape)]
    }

    /// The element a broadcast output position reads (NumPy rules).
    pub fn at_broadcast(&self, out_idx: &[usize]) -> f64 {
        let lead = out_idx.len() - self.shape.len();
        let idx: Vec<usize> =
            self.shape.iter().enumerate().map(|(d, &n)| if n == 1 { 0 } else { out_idx[lead + d] }).collect();
        self.at(&idx)
    }

    pub fn map(&self, f: impl Fn(f64) -> f64) -> Tensor {
        Tensor::new(&self.shape, self.data.iter().map(|&x| f(x)).collect())
    }

    pub fn abs(&self) -> Tensor {
        self.map(f64::abs)
    }
}

/// Rounds to the nearest fp16 value.
pub fn r16(x: f64) -> f64 {
    f16::from_f64(x).to_f64()
}

/// A program under construction plus the random inputs bound to it.
pub struct Case {
    pub precision: Precision,
    /// Program and surface dtype: fp32 in fp32 mode, fp16 in fp16 mode.
    pub dtype: DType,
    pub b: FunctionBuilder,
    pub inputs: Vec<Tensor>,
    pub weights: Weights,
    pub rng: ChaCha8Rng,
}

impl Case {
    pub fn new(precision: Precision, seed: u64) -> Case {
        let dtype = match precision {
            Precision::Fp32 => DType::Fp32,
            Precision::Fp16 => DType::Fp16,
        };
        let dialect = if dtype == DType::Fp16 { Dialect::Ios16 } else { Dialect::Ios18 };
        Case {
            precision,
            dtype,
            b: FunctionBuilder::new("main", dialect),
            inputs: Vec::new(),
            weights: Weights::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Values representable in the case's dtype (fp16 inputs are fp16 numbers).
    pub fn fit(&self, x: f64) -> f64 {
        match self.dtype {
            DType::Fp16 => r16(x),
            _ => x as f32 as f64,
        }
    }

    /// A random tensor with values uniform in `[lo, hi)`, already in the case's dtype.
    pub fn random(&mut self, shape: &[usize], lo: f64, hi: f64) -> Tensor {
        let raw: Vec<f64> = (0..numel(shape)).map(|_| self.rng.gen_range(lo..hi)).collect();
        let data = raw.into_iter().map(|x| self.fit(x)).collect();
        Tensor::new(shape, data)
    }

    /// Declares an input holding random values in `[lo, hi)`.
    pub fn input(&mut self, name: &str, shape: &[usize], lo: f64, hi: f64) -> (Var, Tensor) {
        let t = self.random(shape, lo, hi);
        self.input_with(name, t)
    }

    /// Declares an input holding `t`.
    pub fn input_with(&mut self, name: &str, t: Tensor) -> (Var, Tensor) {
        let v = self.b.input(name, TensorType::new(self.dtype, t.shape.clone()));
        self.inputs.push(t.clone());
        (v, t)
    }

    /// A constant tensor of the case's dtype.
    pub fn constant(&mut self, name: &str, t: &Tensor) -> Var {
        let v = mil::Value::floats(TensorType::new(self.dtype, t.shape.clone()), t.data.clone());
        self.b.constant(name, v)
    }

    /// A scalar constant of the case's dtype.
    pub fn scalar(&mut self, v: f64) -> Var {
        self.b.scalar(self.dtype, v)
    }

    pub fn device(&self) -> CpuDevice {
        CpuDevice::new(self.precision)
    }

    /// Compiles and runs with the inputs declared so far; returns the outputs.
    pub fn run(self, outputs: &[&Var]) -> Vec<Tensor> {
        let device = self.device();
        self.run_on(&device, outputs)
    }

    /// In fp16 mode each output is returned twice — as declared (an fp16 surface) and
    /// cast to fp32 (a free view: the value as the device holds it) — and the two are
    /// checked to agree and to be fp16 numbers, so every op test also checks that
    /// results are rounded where they are computed, not only when written out.
    pub fn run_on(mut self, device: &CpuDevice, outputs: &[&Var]) -> Vec<Tensor> {
        let mut declared: Vec<Var> = outputs.iter().map(|v| (*v).clone()).collect();
        for o in outputs {
            self.b.output(o);
        }
        if self.dtype == DType::Fp16 {
            for o in outputs {
                let wide = self.b.cast(&format!("{}__as_fp32", o.name), o, DType::Fp32);
                self.b.output(&wide);
                declared.push(wide);
            }
        }
        let dialect = if self.dtype == DType::Fp16 { Dialect::Ios16 } else { Dialect::Ios18 };
        let program = Program::new(dialect, self.b.finish().expect("test program is valid"));
        let mut kernel = device.compile(&program, &self.weights).expect("test program compiles");
        let surfaces: Vec<Surface> = self
            .inputs
            .iter()
            .map(|t| Surface::from_f32(self.dtype, &t.shape, &t.data.iter().map(|&x| x as f32).collect::<Vec<_>>()))
            .collect();
        let mut outs: Vec<Surface> = declared.iter().map(|v| Surface::zeros(v.ty.dtype, &v.ty.shape)).collect();
        {
            let ins: Vec<&Surface> = surfaces.iter().collect();
            let mut refs: Vec<&mut Surface> = outs.iter_mut().collect();
            kernel.eval(&ins, &mut refs).expect("test program runs");
        }
        let tensors: Vec<Tensor> =
            outs.iter().map(|s| Tensor::new(s.shape(), s.to_f32().iter().map(|&x| x as f64).collect())).collect();
        let n = outputs.len();
        if self.dtype == DType::Fp16 {
            for i in 0..n {
                let (narrow, wide) = (&tensors[i], &tensors[n + i]);
                for (k, (&a, &b)) in narrow.data.iter().zip(&wide.data).enumerate() {
                    assert!(r16(b) == b || b.is_nan(), "output {i} element {k}: {b} is not an fp16 value");
                    assert!(a == b || (a.is_nan() && b.is_nan()), "output {i} element {k}: fp16 surface {a}, held {b}");
                }
            }
        }
        tensors.into_iter().take(n).collect()
    }
}

/// How far a result may be from the f64 reference: `abs + rel·|want| + mag_rel·mag`,
/// where `mag` is the same computation on absolute values (the size of the terms a sum
/// cancelled), when one is given.
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    pub rel: f64,
    pub abs: f64,
    pub mag_rel: f64,
}

impl Tol {
    /// f32 arithmetic: `ulps` units of f32 roundoff, relative.
    pub fn f32(ulps: f64) -> Tol {
        Tol { rel: ulps * U32, abs: 1e-35, mag_rel: 0.0 }
    }

    /// For a case: in fp32 mode `ulps` of f32 roundoff; in fp16 mode one rounding of the
    /// result to fp16 (relative 2⁻¹¹, taken as 2⁻¹⁰ to cover the f32 work before it;
    /// absolute 2⁻²⁴ for results in fp16's subnormal range) on top.
    pub fn one_op(p: Precision, ulps: f64) -> Tol {
        match p {
            Precision::Fp32 => Tol::f32(ulps),
            Precision::Fp16 => Tol { rel: EPS16 + ulps * U32, abs: TINY16, mag_rel: 0.0 },
        }
    }

    /// A sum of `terms` products accumulated in f32 (error ≤ terms·u·Σ|terms|, the
    /// standard bound, doubled), plus the final fp16 rounding in fp16 mode.
    pub fn dot(p: Precision, terms: usize) -> Tol {
        let mut t = Tol::one_op(p, 4.0);
        t.mag_rel = 2.0 * (terms as f64 + 2.0) * U32;
        t
    }
}

/// Asserts `got` matches `want` within `tol` everywhere; `mag` as in [`Tol`].
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, mag: Option<&Tensor>, tol: Tol) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    for i in 0..want.data.len() {
        let (g, w) = (got.data[i], want.data[i]);
        let m = mag.map_or(0.0, |m| m.data[i]);
        let bound = tol.abs + tol.rel * w.abs() + tol.mag_rel * m;
        let ok = (g.is_nan() && w.is_nan()) || g == w || (g - w).abs() <= bound;
        assert!(
            ok,
            "{what}: element {i} {:?} is {g}, reference {w} (|diff| {:e} > bound {bound:e})",
            unravel(i, &want.shape),
            (g - w).abs()
        );
    }
}
