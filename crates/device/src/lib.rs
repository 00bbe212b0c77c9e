//! # device — where MIL programs run
//!
//! A [`Device`] compiles a MIL [`Program`] plus its weight files into a [`Kernel`]; a
//! kernel reads input [`Surface`]s and writes output surfaces. Training pipelines are
//! written once against these traits and run unchanged on:
//!
//! - [`cpu::CpuDevice`]: executes the IR op by op, in fp32 or rounding every op's result
//!   to fp16 as the ANE computes; GEMM-class ops go to a fast multithreaded GEMM;
//! - [`ane::AneDevice`]: the Apple Neural Engine through the private
//!   AppleNeuralEngine framework, loaded at run time; on other systems it reports
//!   "ANE not available on this system: …".
//!
//! ```
//! use device::{cpu::CpuDevice, Device, Precision, Surface};
//! use mil::{builder::FunctionBuilder, blob::Weights, DType, Dialect, Program, TensorType};
//!
//! let mut b = FunctionBuilder::new("main", Dialect::Ios18);
//! let x = b.input("x", TensorType::surface(DType::Fp32, 4, 16));
//! let y = b.relu("y", &x);
//! b.output(&y);
//! let program = Program::new(Dialect::Ios18, b.finish().unwrap());
//!
//! let device = CpuDevice::new(Precision::Fp32);
//! let mut kernel = device.compile(&program, &Weights::new()).unwrap();
//! let mut input = Surface::zeros(DType::Fp32, &[1, 4, 1, 16]);
//! input.write_f32(&(0..64).map(|i| i as f32 - 32.0).collect::<Vec<_>>());
//! let mut output = Surface::zeros(DType::Fp32, &[1, 4, 1, 16]);
//! kernel.eval(&[&input], &mut [&mut output]).unwrap();
//! assert_eq!(output.to_f32()[0], 0.0);
//! assert_eq!(output.to_f32()[63], 31.0);
//! ```

pub mod ane;
pub mod cpu;
pub mod info;
pub mod memory;
pub mod probe;
mod surface;

use std::fmt;

pub use mil::blob::Weights;
use mil::{Dialect, Program, Var};
pub use surface::{padded_width, Surface};

/// How a device rounds arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Precision {
    /// Every op computes and stores fp32 (the CPU device's default).
    Fp32,
    /// Every op's result is rounded to fp16, as on the ANE.
    Fp16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Precision, String> {
        match s {
            "fp32" => Ok(Precision::Fp32),
            "fp16" => Ok(Precision::Fp16),
            _ => Err(format!("unknown precision `{s}`: expected fp32 or fp16")),
        }
    }
}

/// What went wrong on a device.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The device cannot exist here (no ANE on Linux, framework missing): exit status 2.
    Unavailable,
    /// The program is not valid MIL, or uses something this device cannot run.
    Program,
    /// The process's compile budget is spent; the caller should checkpoint and restart.
    CompileBudget,
    /// The device's compiler rejected the program.
    Compile,
    /// Surfaces given to `eval` do not match the kernel's declared inputs and outputs.
    Binding,
    /// A failure while evaluating.
    Eval,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error { kind, message: message.into() }
    }

    pub fn unavailable(reason: impl fmt::Display) -> Error {
        Error::new(ErrorKind::Unavailable, format!("ANE not available on this system: {reason}"))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<mil::Error> for Error {
    fn from(e: mil::Error) -> Error {
        Error::new(ErrorKind::Program, e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Something that turns MIL programs into runnable kernels.
pub trait Device: Send + Sync {
    /// A short name: `cpu`, `ane`.
    fn name(&self) -> &str;

    /// The dialect this device wants programs in (the ANE's depends on the chip).
    fn dialect(&self) -> Dialect;

    /// The arithmetic the device's kernels do.
    fn precision(&self) -> Precision;

    /// Compiles `program` with its weight files. Weights are read now: changing them
    /// afterwards changes nothing in the kernel, as on the ANE.
    fn compile(&self, program: &Program, weights: &Weights) -> Result<Box<dyn Kernel>>;

    /// Compiles this process may still do before the device refuses, if it has a budget.
    fn compiles_left(&self) -> Option<usize>;

    /// Compiles done so far in this process.
    fn compiles_done(&self) -> usize;
}

/// A compiled program.
pub trait Kernel: Send {
    /// Declared inputs, in the order `eval` takes them.
    fn inputs(&self) -> &[Var];

    /// Declared outputs, in the order `eval` writes them.
    fn outputs(&self) -> &[Var];

    /// Runs the program: `inputs[i]` binds to `self.inputs()[i]`, `outputs[j]` to
    /// `self.outputs()[j]`. Shapes and dtypes must match the declarations exactly.
    fn eval(&mut self, inputs: &[&Surface], outputs: &mut [&mut Surface]) -> Result<()>;

    /// The device's own time for the last eval in nanoseconds, where it reports one.
    fn last_hw_time_ns(&self) -> Option<u64> {
        None
    }
}

/// Checks surfaces against declared values: count, dtype and shape. Every device calls
/// this before touching memory, so binding mistakes read the same everywhere.
pub fn check_binding(what: &str, declared: &[Var], given: &[&Surface]) -> Result<()> {
    if declared.len() != given.len() {
        return Err(Error::new(
            ErrorKind::Binding,
            format!("kernel takes {} {what}s ({}), {} given", declared.len(), names(declared), given.len()),
        ));
    }
    for (var, s) in declared.iter().zip(given) {
        if var.ty.dtype != s.dtype() || var.ty.shape != s.shape() {
            return Err(Error::new(
                ErrorKind::Binding,
                format!(
                    "{what} `{}` is declared {}, but the surface given is {}",
                    var.name,
                    var.ty,
                    mil::TensorType::new(s.dtype(), s.shape().to_vec())
                ),
            ));
        }
    }
    Ok(())
}

fn names(vars: &[Var]) -> String {
    vars.iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", ")
}
