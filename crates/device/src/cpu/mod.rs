//! The CPU device: runs MIL programs exactly as written, as a stand-in for the ANE and
//! as the fast path on machines without one.
//!
//! Compiling validates the `main` function, reads every BLOBFILE weight into the kernel
//! (so changing the [`Weights`] afterwards changes nothing, as on the ANE), and plans the
//! whole evaluation once: views for ops that only re-index, one arena
//! for temporaries, results computed in place in fp32 output surfaces. An eval then
//! binds surfaces and runs the planned steps without allocating.
//!
//! # What is rounded where
//!
//! Values are held as f32 in both precisions.
//!
//! - [`Precision::Fp32`]: nothing is rounded except what the program declares fp16 as
//!   data: fp16 input surfaces, fp16 constants and weights (fp16 numbers by definition),
//!   and fp16 output surfaces when written. `cast` to fp16 is free and exact: the value
//!   stays f32 (this mode is the fp32 reference).
//! - [`Precision::Fp16`], as the ANE computes: every op that computes rounds its result
//!   to fp16 (round to nearest even, overflow to ±∞, fp16 subnormals kept), and fp32
//!   literals are rounded at compile time. Inside an op:
//!   - elementwise ops compute each element in f32 and round it: one rounding per op;
//!   - `matmul` and `conv` accumulate in f32 (GEMM) and round the finished result (after
//!     the bias for `conv`);
//!   - `softmax` and the reductions compute in f32 and round the final values;
//!   - `cast` to fp16 rounds; views (`reshape`, `transpose`, slices, …) copy nothing and
//!     so round nothing; fp32 input surfaces enter unrounded (the programs cast them).
//!
//! Integer values (`cast` to int32, `gather` indices) are held in f32 too: exact up to
//! 2²⁴, far beyond any index a model here uses.
//!
//! # The compile budget
//!
//! The ANE refuses compiles after about [`ANE_COMPILE_BUDGET`] per process; training
//! works around it by checkpointing and restarting. [`CpuDevice::with_compile_limit`]
//! emulates that, so the restart logic runs in tests on any machine.

mod attention;
mod bench;
mod elementwise;
mod exec;
mod gemv;
mod linalg;
mod math;
mod plan;
mod reduce;
mod region;
mod view;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mil::{Dialect, Program};

pub use bench::{bench_gemm, format_gemm_bench, GemmBenchConfig, GemmBenchOp, GemmBenchRow};
pub use elementwise::simd;
pub(crate) use elementwise::Ptr;
pub use linalg::gemm_on_threads;

use crate::{Device, Error, ErrorKind, Kernel, Precision, Result, Weights};

/// Compiles one process may do on the ANE: reported by the 2026 ANE training
/// experiments: compiles fail after ≈119 per process.
pub const ANE_COMPILE_BUDGET: usize = 119;

/// Runs MIL programs on the CPU. Cheap to clone; clones share one compile counter, so a
/// budget set with [`with_compile_limit`](Self::with_compile_limit) is per device
/// instance and all its clones (think: per process), not per clone.
#[derive(Clone, Debug)]
pub struct CpuDevice {
    precision: Precision,
    dialect: Dialect,
    threads: usize,
    fuse: bool,
    compile_limit: Option<usize>,
    sim_compile: Duration,
    compiles: Arc<AtomicUsize>,
}

impl CpuDevice {
    /// A device computing in `precision`, wanting ios18 programs (it runs ios16 ones
    /// too), using every rayon thread, with no compile budget.
    pub fn new(precision: Precision) -> CpuDevice {
        CpuDevice {
            precision,
            dialect: Dialect::Ios18,
            threads: rayon::current_num_threads(),
            fuse: true,
            compile_limit: None,
            sim_compile: Duration::ZERO,
            compiles: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Emulates the ANE's per-process compile budget: compile number `n + 1` fails with
    /// [`ErrorKind::CompileBudget`]. [`ANE_COMPILE_BUDGET`] is the ANE's figure.
    pub fn with_compile_limit(mut self, n: usize) -> CpuDevice {
        self.compile_limit = Some(n);
        self
    }

    /// Makes every compile take at least `ms` milliseconds (the ANE's compiles take tens
    /// to hundreds), to exercise compiling in the background while evaluating.
    pub fn with_sim_compile_ms(mut self, ms: u64) -> CpuDevice {
        self.sim_compile = Duration::from_millis(ms);
        self
    }

    /// At most `n` parallel tasks per op (GEMM and large elementwise ops), on rayon's
    /// global pool. 1 runs everything on the calling thread.
    pub fn with_threads(mut self, n: usize) -> CpuDevice {
        self.threads = n.max(1);
        self
    }

    /// Whether compiling may fuse (on by default): attention's `softmax(matmul +
    /// constant mask)` becomes one pass that skips causally masked scores, and runs of
    /// steps over the same attention heads run head by head, in cache. Off, every op is
    /// its own step, run over all heads; for comparisons and benchmarks.
    pub fn with_fusion(mut self, fuse: bool) -> CpuDevice {
        self.fuse = fuse;
        self
    }

    /// The dialect [`Device::dialect`] reports (both are always accepted).
    pub fn with_dialect(mut self, dialect: Dialect) -> CpuDevice {
        self.dialect = dialect;
        self
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Takes one compile from the budget, or says why not.
    fn take_compile(&self) -> Result<()> {
        let limit = self.compile_limit;
        let taken = self.compiles.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |done| match limit {
            Some(n) if done >= n => None,
            _ => Some(done + 1),
        });
        match (taken, limit) {
            (Ok(_), _) => Ok(()),
            (Err(done), Some(n)) => Err(Error::new(
                ErrorKind::CompileBudget,
                format!(
                    "compile budget spent: {done} of {n} compiles done on this device (the ANE allows \
                     ≈{ANE_COMPILE_BUDGET} per process); checkpoint and restart the process to continue"
                ),
            )),
            (Err(_), None) => unreachable!("an unlimited budget never refuses"),
        }
    }
}

impl Device for CpuDevice {
    fn name(&self) -> &str {
        "cpu"
    }

    fn dialect(&self) -> Dialect {
        self.dialect
    }

    fn precision(&self) -> Precision {
        self.precision
    }

    /// Validates first (an invalid program costs no budget), then takes a compile from
    /// the budget, then plans.
    fn compile(&self, program: &Program, weights: &Weights) -> Result<Box<dyn Kernel>> {
        let main =
            program.main().ok_or_else(|| Error::new(ErrorKind::Program, "the program has no function to run"))?;
        let scope = mil::ops::validate_function(main)?;
        self.take_compile()?;
        if !self.sim_compile.is_zero() {
            std::thread::sleep(self.sim_compile);
        }
        let kernel = plan::compile(main, scope, weights, self.precision, self.threads, self.fuse)?;
        Ok(Box::new(kernel))
    }

    fn compiles_left(&self) -> Option<usize> {
        self.compile_limit.map(|n| n.saturating_sub(self.compiles_done()))
    }

    fn compiles_done(&self) -> usize {
        self.compiles.load(Ordering::SeqCst)
    }
}
