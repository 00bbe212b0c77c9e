//! A cost model of one training step on the ANE, for those of us without a Mac.
//!
//! Nobody here can time an ANE, so this predicts it. Three inputs, all explicit:
//!
//! 1. **The kernels**: the MIL programs the pipelines generate, read op by op
//!    ([`KernelWork::of`]): FLOPs of `matmul` and `conv`, elementwise work, the bytes of
//!    the input and output surfaces and of baked weights. Nothing about a kernel is
//!    written down by hand here; when a generator changes, the model follows.
//! 2. **The schedule** ([`plan`]): the order in which a pipeline evaluates its kernels
//!    and what the CPU does between them (surface I/O, RMSNorm, RoPE, the classifier, the
//!    weight gradients), mirrored from `pipeline.rs` and `static_pipeline.rs`. A test runs
//!    the real pipelines on a recording device and checks the evaluation order matches.
//!    Fusions the pipelines do not implement yet ([`Fusion`]) are options of the plan.
//! 3. **The chip** ([`Chip`]): published figures, each with its source (docs/ANE.md),
//!    or a probe JSON from `anetrain probe` on a real Mac ([`Chip::with_probe`]).
//!
//! Each kernel takes `max(compute, surface traffic) + dispatch`, where compute is
//! FLOPs at the achievable rate (matmul at a third of the conv peak) and is slowed past
//! the SRAM cliff. CPU work takes GEMM FLOPs at the chip's Accelerate rate plus streamed
//! bytes at one core's bandwidth. The step is then simulated on two clocks: the main
//! thread (which waits for every kernel: evaluations are synchronous) and, with the
//! async-dW fusion, a background queue for the weight gradients, joined before the
//! optimizer. What the published figures leave out is left out here too: the optimizer
//! step (the seed accumulates 10 micro-batches per update) and compile time (printed
//! apart).
//!
//! Not run on hardware: every figure this module prints is a prediction.

use std::collections::BTreeMap;

use llama::Config;
use mil::{Dialect, Program};

use crate::kernels::{self, Gen, KernelDef, LayerDims};
use crate::pipelines::{PipelineConfig, PipelineKind};
use crate::static_kernels as sk;

// --- Constants that hold for every chip ---------------------------------------------

/// A `matmul` runs ≈ 3× slower on the ANE than the 1×1 `conv` doing the same product.
/// Source: the seed (maderix/ANE, docs/ANE_INTERNALS.md); Orion repeats it as prior work.
pub const MATMUL_SLOWDOWN: f64 = 3.0;

/// Per-dispatch overhead of one kernel evaluation, ms. Source: Orion (arXiv 2603.06728),
/// ≈0.095 ms on M4 Max; the seed reports ≈0.2 ms per kernel at 768×256, compute included.
pub const DISPATCH_MS: f64 = 0.095;

/// Working set (baked weights + input surfaces) past which the ANE spills its SRAM.
/// Source: the seed's `sram_probe` on M4 Max (docs/BENCHMARK_RESULTS.md, 2026-03-03): best
/// at 12.5 MB of weights, first spill at 32 MB, "SRAM approximately 24–32 MB".
pub const SRAM_CLIFF_BYTES: f64 = 32.0 * 1024.0 * 1024.0;

/// Compute slowdown past the SRAM cliff. Source: the same probe, 3.60 TFLOPS at 24.5 MB
/// of weights against 1.89 TFLOPS at 32 MB (3.60 / 1.89 ≈ 1.9).
pub const SPILL_SLOWDOWN: f64 = 1.9;

/// Streaming bandwidth of one Apple P-core, GB/s: what one thread's elementwise passes
/// (RMSNorm, residuals, softmax, surface copies) reach, capped by the chip's DRAM.
/// Source: AnandTech's M1 Max review ("Huge memory bandwidth, but not for every block":
/// one core reaches about 100 GB/s); the figure as recalled, not re-read.
pub const CORE_STREAM_GBS: f64 = 100.0;

/// Share of the matrix units' microbenchmark rate that Accelerate's sgemm reaches on a
/// training step's GEMMs (`K` = 256 tokens for the weight gradients, accumulating into
/// fp32 gradients, one call per matrix from a serial queue). The one calibrated constant,
/// fitted once to one published decomposition, the seed's M4 static step: 81 GFLOP of CPU
/// GEMMs (training/README.md: 1.63 total − 0.87 ANE TFLOPS at 106.7 ms/step) done in the
/// ≈97 ms the step does not spend on the ANE (benchmarks/ANE_BENCHMARK_REPORT.md: ANE
/// ≈9–10 ms per step on the M4 family): at most 0.84 TFLOPS, 0.36 of SME's 2.3.
pub const ACCELERATE_EFFICIENCY: f64 = 0.45;

/// Bytes per fp32 value on the CPU side.
const F32: f64 = 4.0;

// --- Chips ----------------------------------------------------------------------------

/// The figures the model needs about one chip. Sources are in the table [`CHIPS`] (one
/// comment per figure) and in docs/ANE.md.
#[derive(Clone, Debug, PartialEq)]
pub struct Chip {
    /// `--chip` name: `m4`, `m4max`, ….
    pub name: &'static str,
    /// What it is, for printing.
    pub label: &'static str,
    /// Peak fp16 TFLOPS of conv-shaped work.
    pub ane_tflops: f64,
    /// Fixed cost of one kernel evaluation, ms.
    pub dispatch_ms: f64,
    /// Bandwidth between the ANE and its surfaces in memory, GB/s.
    pub surface_gbs: f64,
    /// Working set past which compute slows by [`SPILL_SLOWDOWN`], bytes.
    pub sram_cliff_bytes: f64,
    /// fp32 GEMM rate of Accelerate on the CPU's matrix units (AMX or SME) at a training
    /// step's shapes, GFLOP/s: the published peak times [`ACCELERATE_EFFICIENCY`].
    pub cpu_gemm_gflops: f64,
    /// One thread's streaming bandwidth, GB/s.
    pub cpu_stream_gbs: f64,
    /// Compile time of one training kernel, ms (the static pipelines recompile every step).
    pub compile_ms_per_kernel: f64,
    /// Where the chip's figures came from, for printing: `published` or the probe file.
    pub from: String,
}

/// One row of the chip table: the figures and, for printing, where they come from.
struct ChipRow {
    name: &'static str,
    label: &'static str,
    ane_tflops: f64,
    dram_gbs: f64,
    cpu_gemm_gflops: f64,
    compile_ms_per_kernel: f64,
}

/// Apple's rated fp16 TOPS of the 16-core Neural Engine of M2, M3 and M4 (the seed's
/// benchmark report, "Rated TOPS": M3 Pro 15.8; the seed's README: "15.8 TFLOPS FP16
/// (M4)"; Apple's 38 TOPS for M4 is INT8).
const NE16_TFLOPS: f64 = 15.8;

/// One P-cluster's Accelerate sgemm rate on M1-generation AMX, GFLOP/s. Source: nod.ai,
/// "Apple M1 Max matmul performance" (mmperf, Accelerate, one thread): 1.4 TFLOPS.
const M1_CLUSTER_GEMM: f64 = 1400.0;

/// One P-cluster's SME fp32 rate on M4, GFLOP/s. Source: "Hello SME!" (arXiv 2409.18779):
/// "over 2.3 FP32 TFLOPS" on M4.
const M4_CLUSTER_GEMM: f64 = 2300.0;

/// Compile time per kernel on M4-generation chips, ms. Source: the seed's training/README
/// (M4): 7.6 s for a 72-kernel static set = 106 ms per kernel.
const M4_COMPILE_MS: f64 = 106.0;

/// Compile time per kernel on M1 Pro/Max, ms. Source: the seed's benchmark report: 7.1–8.5 s
/// per 72-kernel set = 99–118 ms.
const M1_COMPILE_MS: f64 = 110.0;

/// The chips `--chip` knows.
const CHIP_TABLE: &[ChipRow] = &[
    // M1: 11 TOPS fp16 (Apple; the seed's report, "Rated TOPS": 11); 68.25 GB/s LPDDR4X
    // (Apple); one P-cluster.
    ChipRow {
        name: "m1",
        label: "M1 (16-core NE, 4 P-cores)",
        ane_tflops: 11.0,
        dram_gbs: 68.25,
        cpu_gemm_gflops: M1_CLUSTER_GEMM,
        compile_ms_per_kernel: M1_COMPILE_MS,
    },
    // M1 Pro: the same NE; 200 GB/s (Apple); two P-clusters. Accelerate sgemm 2.1 TFLOPS
    // at 512³ (cyber.page, "Why acpu sgemm beats Apple Accelerate", M1 Pro).
    ChipRow {
        name: "m1pro",
        label: "M1 Pro (16-core NE, 8 P-cores)",
        ane_tflops: 11.0,
        dram_gbs: 200.0,
        cpu_gemm_gflops: 2100.0,
        compile_ms_per_kernel: M1_COMPILE_MS,
    },
    // M1 Max: as M1 Pro, 400 GB/s (Apple).
    ChipRow {
        name: "m1max",
        label: "M1 Max (16-core NE, 8 P-cores)",
        ane_tflops: 11.0,
        dram_gbs: 400.0,
        cpu_gemm_gflops: 2100.0,
        compile_ms_per_kernel: M1_COMPILE_MS,
    },
    // M2: 15.8 TOPS (Apple); 100 GB/s (Apple); no published sgemm figure found: M1's
    // per-cluster rate; compile time as M4 (no figure).
    ChipRow {
        name: "m2",
        label: "M2 (16-core NE, 4 P-cores)",
        ane_tflops: NE16_TFLOPS,
        dram_gbs: 100.0,
        cpu_gemm_gflops: M1_CLUSTER_GEMM,
        compile_ms_per_kernel: M4_COMPILE_MS,
    },
    // M3: as M2 (Apple: 100 GB/s); no sgemm figure: M1's per-cluster rate.
    ChipRow {
        name: "m3",
        label: "M3 (16-core NE, 4 P-cores)",
        ane_tflops: NE16_TFLOPS,
        dram_gbs: 100.0,
        cpu_gemm_gflops: M1_CLUSTER_GEMM,
        compile_ms_per_kernel: M4_COMPILE_MS,
    },
    // M3 Ultra: two dies, 32 NE cores: 31.6 TOPS (the seed's report); 800 GB/s (Apple);
    // M1's per-cluster rate (no figure) on the two P-clusters of one die (an assumption:
    // one sgemm's threads on one die); the seed's report: ~3.7 s per 72-kernel set = 51 ms
    // per kernel.
    ChipRow {
        name: "m3ultra",
        label: "M3 Ultra (32-core NE, 24 P-cores)",
        ane_tflops: 2.0 * NE16_TFLOPS,
        dram_gbs: 800.0,
        cpu_gemm_gflops: 2.0 * M1_CLUSTER_GEMM,
        compile_ms_per_kernel: 51.0,
    },
    // M4: 120 GB/s (Apple); one P-cluster with SME.
    ChipRow {
        name: "m4",
        label: "M4 (16-core NE, 4 P-cores)",
        ane_tflops: NE16_TFLOPS,
        dram_gbs: 120.0,
        cpu_gemm_gflops: M4_CLUSTER_GEMM,
        compile_ms_per_kernel: M4_COMPILE_MS,
    },
    // M4 Pro: the same NE (the seed's report: "Max variants share the same 16-core NE as
    // Pro"); 273 GB/s (Apple); two P-clusters, each with its SME unit: twice M4's rate
    // (an extrapolation); ~3.5 s per 72-kernel set = 49 ms per kernel (the seed's report).
    ChipRow {
        name: "m4pro",
        label: "M4 Pro (16-core NE, 10 P-cores)",
        ane_tflops: NE16_TFLOPS,
        dram_gbs: 273.0,
        cpu_gemm_gflops: 2.0 * M4_CLUSTER_GEMM,
        compile_ms_per_kernel: 49.0,
    },
    // M4 Max: as M4 Pro, 546 GB/s (Apple).
    ChipRow {
        name: "m4max",
        label: "M4 Max (16-core NE, 12 P-cores)",
        ane_tflops: NE16_TFLOPS,
        dram_gbs: 546.0,
        cpu_gemm_gflops: 2.0 * M4_CLUSTER_GEMM,
        compile_ms_per_kernel: 49.0,
    },
    // M5: "the same H16 family as M4" (the seed's report; Apple does not rate it); 153 GB/s
    // (Apple); one P-cluster at M4's rate (no figure); 3.2–3.4 s per set = 46 ms per kernel.
    ChipRow {
        name: "m5",
        label: "M5 (16-core NE, 4 P-cores)",
        ane_tflops: NE16_TFLOPS,
        dram_gbs: 153.0,
        cpu_gemm_gflops: M4_CLUSTER_GEMM,
        compile_ms_per_kernel: 46.0,
    },
];

/// The names `--chip` takes.
pub fn chip_names() -> Vec<&'static str> {
    CHIP_TABLE.iter().map(|c| c.name).collect()
}

impl Chip {
    /// The published figures of chip `name` (`m1`, `m4max`, …), if known.
    pub fn named(name: &str) -> Option<Chip> {
        let r = CHIP_TABLE.iter().find(|c| c.name == name)?;
        Some(Chip {
            name: r.name,
            label: r.label,
            ane_tflops: r.ane_tflops,
            dispatch_ms: DISPATCH_MS,
            // No published figure for the ANE's own port: the chip's DRAM bandwidth.
            surface_gbs: r.dram_gbs,
            sram_cliff_bytes: SRAM_CLIFF_BYTES,
            cpu_gemm_gflops: r.cpu_gemm_gflops * ACCELERATE_EFFICIENCY,
            cpu_stream_gbs: CORE_STREAM_GBS.min(r.dram_gbs),
            compile_ms_per_kernel: r.compile_ms_per_kernel,
            from: "published figures (docs/ANE.md)".into(),
        })
    }

    /// Replaces the figures a probe measured: the `peak` probe's TFLOPS, and the
    /// `dispatch-overhead` probe's fixed cost and per-element cost (which, for a kernel
    /// that reads and writes each element once, gives the surface bandwidth). Probes that
    /// did not pass are ignored; returns what was replaced, for printing.
    pub fn with_probe(
        mut self,
        report: &device::probe::ProbeReport,
        file: &str,
    ) -> Result<(Chip, Vec<String>), String> {
        if report.device != "ane" {
            return Err(format!(
                "{file}: the probes ran on the `{}` device, not on an ANE; its figures would not describe a chip",
                report.device
            ));
        }
        let passed = |name: &str| {
            report.results.iter().find(|r| r.name == name && r.status == device::probe::ProbeStatus::Passed)
        };
        let mut replaced = Vec::new();
        if let Some(tflops) = passed("peak").and_then(|r| r.measurement("tflops")).filter(|v| *v > 0.0) {
            replaced.push(format!("ANE peak {:.2} → {tflops:.2} TFLOPS", self.ane_tflops));
            self.ane_tflops = tflops;
        }
        if let Some(r) = passed("dispatch-overhead") {
            if let Some(us) = r.measurement("dispatch_overhead_us").filter(|v| *v > 0.0) {
                replaced.push(format!("dispatch {:.3} → {:.3} ms", self.dispatch_ms, us / 1e3));
                self.dispatch_ms = us / 1e3;
            }
            if let Some(ns) = r.measurement("ns_per_element").filter(|v| *v > 0.0) {
                // The probe's kernel reads and writes every element once, in the surface dtype.
                let bytes = if report.dialect == "ios16" { 2.0 } else { 4.0 };
                let gbs = 2.0 * bytes / ns;
                replaced.push(format!("surface bandwidth {:.0} → {gbs:.0} GB/s", self.surface_gbs));
                self.surface_gbs = gbs;
            }
        }
        if replaced.is_empty() {
            return Err(format!("{file}: no passed `peak` or `dispatch-overhead` probe to take figures from"));
        }
        self.from = format!("{file} ({} on {})", replaced.join(", "), report.machine);
        Ok((self, replaced))
    }

    /// The dialect the chip's kernels are generated in: M1 and M2 reject `cast`, so they
    /// take fp16 surfaces (ios16); M3 and later fp32 surfaces cast inside (ios18). Source:
    /// the seed's PR #6 (M1 Pro); docs/ANE.md.
    pub fn dialect(&self) -> Dialect {
        if self.name.starts_with("m1") || self.name.starts_with("m2") {
            Dialect::Ios16
        } else {
            Dialect::Ios18
        }
    }

    /// Milliseconds of one kernel evaluation.
    pub fn kernel_time(&self, w: &KernelWork) -> KernelTime {
        let peak = self.ane_tflops * 1e12;
        let mut compute_ms =
            (w.conv_flops / peak + (w.matmul_flops + w.elementwise_ops) * MATMUL_SLOWDOWN / peak) * 1e3;
        let spilled = w.working_set_bytes() > self.sram_cliff_bytes;
        if spilled {
            compute_ms *= SPILL_SLOWDOWN;
        }
        let io_ms = w.io_bytes() / (self.surface_gbs * 1e9) * 1e3;
        KernelTime { compute_ms, io_ms, dispatch_ms: self.dispatch_ms, spilled }
    }

    /// Milliseconds of CPU work.
    pub fn cpu_ms(&self, w: &CpuWork) -> f64 {
        (w.gemm_flops / (self.cpu_gemm_gflops * 1e9) + w.stream_bytes / (self.cpu_stream_gbs * 1e9)) * 1e3
    }
}

// --- Kernels ---------------------------------------------------------------------------

/// What one kernel evaluation does, read from its MIL program.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KernelWork {
    pub name: String,
    /// FLOPs of `conv` ops (the ANE's fastest path).
    pub conv_flops: f64,
    /// FLOPs of `matmul` ops.
    pub matmul_flops: f64,
    /// The part of `matmul_flops` whose one operand is a baked constant (a weight of the
    /// static kernels): what a 1×1 `conv` could do instead.
    pub baked_matmul_flops: f64,
    /// Elementwise, reduction and softmax operations (one per element and pass).
    pub elementwise_ops: f64,
    /// Bytes of the input surfaces.
    pub input_bytes: f64,
    /// Bytes of the output surfaces.
    pub output_bytes: f64,
    /// Bytes of the baked (BLOBFILE) weights.
    pub const_bytes: f64,
    /// Elements of every surface, with their bytes per element: the CPU copies each in or
    /// out once per evaluation (fp32 on the CPU side).
    pub io_elements: f64,
    /// Bytes per surface element (2 for fp16 surfaces, 4 for fp32).
    pub surface_elem_bytes: f64,
    /// Elements of the input blocks that hold weights (the layouts' blocks named `w…`).
    pub weight_elements: f64,
}

/// The time of one evaluation of a kernel on a chip.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KernelTime {
    pub compute_ms: f64,
    pub io_ms: f64,
    pub dispatch_ms: f64,
    /// The working set passes the SRAM cliff.
    pub spilled: bool,
}

impl KernelTime {
    pub fn total_ms(&self) -> f64 {
        self.compute_ms.max(self.io_ms) + self.dispatch_ms
    }

    /// `compute` or `surface I/O`: which of the two bounds the kernel.
    pub fn bound(&self) -> &'static str {
        if self.compute_ms >= self.io_ms {
            "compute"
        } else {
            "surface I/O"
        }
    }
}

/// Ops that only re-index (views on the CPU device; layout changes on the ANE, priced
/// at nothing for want of a published figure).
const VIEW_OPS: &[&str] = &[
    "const",
    "reshape",
    "transpose",
    "slice_by_size",
    "slice_by_index",
    "split",
    "expand_dims",
    "squeeze",
    "identity",
];

/// Passes over its input a softmax makes: max, subtract and exp, sum, divide.
const SOFTMAX_PASSES: f64 = 4.0;

impl KernelWork {
    /// Reads a kernel's program and weights.
    pub fn of(def: &KernelDef) -> KernelWork {
        let mut w = KernelWork::of_program(def.name, &def.program);
        w.const_bytes = def.weights.files().map(|(_, bytes)| bytes.len() as f64).sum();
        w.weight_elements = def
            .inputs()
            .iter()
            .flat_map(|s| &s.blocks)
            .filter(|b| b.name.starts_with('w'))
            .map(|b| (b.rows * b.width) as f64)
            .sum();
        w
    }

    /// Reads a program (without its weight files: [`KernelWork::const_bytes`] stays 0).
    pub fn of_program(name: &str, program: &Program) -> KernelWork {
        let mut w = KernelWork { name: name.to_string(), ..KernelWork::default() };
        let Some(f) = program.main() else { return w };
        let numel = |ty: &mil::TensorType| ty.numel() as f64;
        for v in &f.inputs {
            w.input_bytes += numel(&v.ty) * v.ty.dtype.size_bytes() as f64;
            w.io_elements += numel(&v.ty);
            w.surface_elem_bytes = v.ty.dtype.size_bytes() as f64;
        }
        for v in f.output_vars() {
            w.output_bytes += numel(&v.ty) * v.ty.dtype.size_bytes() as f64;
            w.io_elements += numel(&v.ty);
        }
        for op in &f.ops {
            let Some(out) = op.outputs.first() else { continue };
            let out_elems: f64 = op.outputs.iter().map(|o| numel(&o.ty)).sum();
            let arg_ty = |arg: &str| match op.arg(arg) {
                Some(mil::Arg::Var(name)) => f.type_of(name).cloned(),
                _ => None,
            };
            // An operand made by a `const` op (a baked weight).
            let is_const = |arg: &str| match op.arg(arg) {
                Some(mil::Arg::Var(name)) => {
                    f.ops.iter().any(|o| o.op == "const" && o.outputs.first().is_some_and(|v| &v.name == name))
                }
                _ => false,
            };
            // A flag given inline or through a `const` op.
            let flag = |arg: &str| match op.arg(arg) {
                Some(mil::Arg::Value(v)) => v.as_bool().unwrap_or(false),
                Some(mil::Arg::Var(name)) => f
                    .ops
                    .iter()
                    .find(|o| o.outputs.first().is_some_and(|v| &v.name == name))
                    .and_then(|o| o.const_value())
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false),
                _ => false,
            };
            match op.op.as_str() {
                o if VIEW_OPS.contains(&o) => {}
                "matmul" => {
                    // The inner dimension: x's last axis, or its second last if transposed.
                    let k = arg_ty("x").map_or(0, |t| {
                        let r = t.shape.len();
                        if flag("transpose_x") {
                            t.shape[r - 2]
                        } else {
                            t.shape[r - 1]
                        }
                    });
                    let flops = 2.0 * numel(&out.ty) * k as f64;
                    w.matmul_flops += flops;
                    if is_const("x") || is_const("y") {
                        w.baked_matmul_flops += flops;
                    }
                }
                "conv" => {
                    // weight [O, I/groups, kh, kw]: each output takes I/groups·kh·kw MACs.
                    let per_out = arg_ty("weight").map_or(0, |t| t.shape[1..].iter().product::<usize>());
                    w.conv_flops += 2.0 * numel(&out.ty) * per_out as f64;
                }
                "softmax" => w.elementwise_ops += SOFTMAX_PASSES * out_elems,
                o if mil::ops::REDUCE_OPS.contains(&o) => {
                    w.elementwise_ops += arg_ty("x").map_or(out_elems, |t| numel(&t));
                }
                _ => w.elementwise_ops += out_elems,
            }
        }
        w
    }

    /// This kernel with its baked-weight matmuls written as 1×1 convs.
    fn with_convs(mut self) -> KernelWork {
        self.conv_flops += self.baked_matmul_flops;
        self.matmul_flops -= self.baked_matmul_flops;
        self.baked_matmul_flops = 0.0;
        self
    }

    /// All FLOPs, counting each elementwise operation as one.
    pub fn flops(&self) -> f64 {
        self.conv_flops + self.matmul_flops + self.elementwise_ops
    }

    /// Surface bytes moved per evaluation.
    pub fn io_bytes(&self) -> f64 {
        self.input_bytes + self.output_bytes
    }

    /// What must sit in the ANE's SRAM: baked weights and the input surfaces (which, in the
    /// dynamic pipeline, carry the weights).
    pub fn working_set_bytes(&self) -> f64 {
        self.const_bytes + self.input_bytes
    }

    /// The CPU's side of one evaluation: every surface element written or read once,
    /// from or into an fp32 buffer (with `staged` weights, all but the weight blocks).
    pub fn cpu_copy(&self, staged: bool) -> CpuWork {
        let elements = if staged { self.io_elements - self.weight_elements } else { self.io_elements };
        CpuWork::stream(elements * (F32 + self.surface_elem_bytes))
    }

    /// This kernel and `other` as one: both kernels' work and surfaces, less the surface
    /// traffic that now stays inside (`dropped_inputs` of the inputs, `dropped_outputs` of
    /// the outputs), and one dispatch instead of two.
    fn fused(&self, name: &str, other: &KernelWork, dropped_inputs: f64, dropped_outputs: f64) -> KernelWork {
        let elem = self.surface_elem_bytes.max(other.surface_elem_bytes);
        let input_bytes = (self.input_bytes + other.input_bytes - dropped_inputs).max(0.0);
        let output_bytes = (self.output_bytes + other.output_bytes - dropped_outputs).max(0.0);
        KernelWork {
            name: name.to_string(),
            conv_flops: self.conv_flops + other.conv_flops,
            matmul_flops: self.matmul_flops + other.matmul_flops,
            baked_matmul_flops: self.baked_matmul_flops + other.baked_matmul_flops,
            elementwise_ops: self.elementwise_ops + other.elementwise_ops,
            input_bytes,
            output_bytes,
            const_bytes: self.const_bytes + other.const_bytes,
            io_elements: (input_bytes + output_bytes) / elem.max(1.0),
            surface_elem_bytes: elem,
            weight_elements: self.weight_elements + other.weight_elements,
        }
    }
}

// --- CPU work --------------------------------------------------------------------------

/// CPU work: GEMM FLOPs (Accelerate on the matrix units) and streamed bytes (one thread).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuWork {
    pub gemm_flops: f64,
    pub stream_bytes: f64,
}

impl CpuWork {
    /// `C [m, n] (+)= A [m, k] · B [k, n]` in fp32: its FLOPs, and its operands read once
    /// and `C` written (and read first when `accumulate`, as weight gradients are).
    pub fn gemm(m: usize, n: usize, k: usize, accumulate: bool) -> CpuWork {
        let (m, n, k) = (m as f64, n as f64, k as f64);
        let c_passes = if accumulate { 2.0 } else { 1.0 };
        CpuWork { gemm_flops: 2.0 * m * n * k, stream_bytes: F32 * (m * k + k * n + c_passes * m * n) }
    }

    /// The sum of two pieces of work.
    pub fn plus(self, other: CpuWork) -> CpuWork {
        CpuWork { gemm_flops: self.gemm_flops + other.gemm_flops, stream_bytes: self.stream_bytes + other.stream_bytes }
    }
    pub fn stream(bytes: f64) -> CpuWork {
        CpuWork { gemm_flops: 0.0, stream_bytes: bytes }
    }
}

/// The phases a step's time is reported in (the names of `telemetry::PhasesMs`).
pub const PHASES: [&str; 6] = ["surface_io", "rmsnorm", "classifier", "dw", "other", "ane"];

// --- Fusions ---------------------------------------------------------------------------

/// The upstream seed's changes that anetrain's pipelines do not make yet, as options of
/// the modelled schedule (issue 25, part 3). Each is priced alone and all together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fusion {
    /// RMSNorm forward inside the QKV and FFN forward kernels (dynamic; static has it).
    RmsNorm,
    /// Woᵀ inside the weight-free attention backward (static; dynamic has it).
    WoT,
    /// Classifier and its softmax as ANE kernels (dynamic; static has `--ane-extras`).
    Classifier,
    /// Weight gradients on a background queue, the wait deferred to the optimizer step.
    AsyncDw,
    /// Fewer, larger kernels: QKV merged into attention forward (RoPE inside) and the QKV
    /// backward into the attention backward: two dispatches fewer per layer (dynamic).
    FewerKernels,
    /// DeepNet-style α residual scaling: a numerical option; its cost is one multiply in
    /// the residual add the CPU does anyway.
    AlphaResidual,
    /// The static kernels' baked-weight products as 1×1 convs instead of matmuls, as the
    /// seed writes them (the ANE runs conv ≈3× faster, [`MATMUL_SLOWDOWN`]).
    ConvWeights,
    /// Per-layer input surfaces whose weight blocks are written once per optimizer step
    /// (upstream's `pls[L]`), not before every evaluation: with `--accum N` the copy is
    /// paid once per N micro-batches (dynamic).
    StagedWeights,
}

impl Fusion {
    pub const ALL: [Fusion; 8] = [
        Fusion::RmsNorm,
        Fusion::WoT,
        Fusion::Classifier,
        Fusion::AsyncDw,
        Fusion::FewerKernels,
        Fusion::AlphaResidual,
        Fusion::ConvWeights,
        Fusion::StagedWeights,
    ];

    /// The name `--fusions` takes.
    pub fn name(self) -> &'static str {
        match self {
            Fusion::RmsNorm => "rmsnorm",
            Fusion::WoT => "wo",
            Fusion::Classifier => "classifier",
            Fusion::AsyncDw => "async-dw",
            Fusion::FewerKernels => "fewer-kernels",
            Fusion::AlphaResidual => "alpha",
            Fusion::ConvWeights => "conv",
            Fusion::StagedWeights => "staged-weights",
        }
    }

    pub fn from_name(name: &str) -> Option<Fusion> {
        Fusion::ALL.into_iter().find(|f| f.name() == name)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Fusion::RmsNorm => "RMSNorm forward inside the QKV and FFN forward kernels",
            Fusion::WoT => "Woᵀ fused into the attention backward",
            Fusion::Classifier => "classifier + softmax as ANE kernels",
            Fusion::AsyncDw => "dW GEMMs async on the CPU, wait deferred to the optimizer",
            Fusion::FewerKernels => "QKV merged into the attention kernels (2 dispatches fewer per layer)",
            Fusion::AlphaResidual => "DeepNet α residual scaling",
            Fusion::ConvWeights => "baked weights as 1×1 convs, not matmuls (the seed's static kernels)",
            Fusion::StagedWeights => "weights staged in per-layer surfaces once per optimizer step",
        }
    }

    /// Why the fusion does not change `pipeline`, if it does not apply.
    pub fn not_applicable(self, pipeline: PipelineConfig) -> Option<&'static str> {
        let dynamic = pipeline.kind == PipelineKind::Dynamic;
        match self {
            Fusion::RmsNorm if !dynamic => Some("the static kernels already fuse it"),
            Fusion::WoT if dynamic => Some("the dynamic attention backward already fuses it"),
            Fusion::Classifier if !dynamic && pipeline.ane_extras => Some("--ane-extras already runs it on the ANE"),
            Fusion::Classifier if !dynamic => Some("the static pipelines take --ane-extras instead"),
            Fusion::FewerKernels if !dynamic => Some("the static kernels already merge QKV into attention forward"),
            Fusion::ConvWeights if dynamic => {
                Some("the dynamic kernels' weights arrive in surfaces: no constant to convolve")
            }
            Fusion::StagedWeights if !dynamic => Some("the static kernels bake their weights"),
            _ => None,
        }
    }
}

/// A set of fusions.
pub type Fusions = std::collections::BTreeSet<Fusion>;

/// Parses `--fusions`: `none`, `all`, or names separated by commas.
pub fn parse_fusions(list: &str) -> Result<Fusions, String> {
    match list.trim() {
        "none" | "" => return Ok(Fusions::new()),
        "all" => return Ok(Fusion::ALL.into_iter().collect()),
        _ => {}
    }
    list.split(',')
        .map(|n| {
            Fusion::from_name(n.trim()).ok_or_else(|| {
                let known: Vec<&str> = Fusion::ALL.iter().map(|f| f.name()).collect();
                format!("unknown fusion `{}`; the fusions are: {} (or all, none)", n.trim(), known.join(", "))
            })
        })
        .collect()
}

// --- Plans -----------------------------------------------------------------------------

/// One thing a step does, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Task {
    /// Evaluate kernel `i` of [`Plan::kernels`]; the main thread waits for it.
    Eval(usize),
    /// CPU work on the main thread, reported under `phase`.
    Cpu(&'static str, CpuWork),
    /// CPU work that the async-dW schedule hands to the background queue (on the main
    /// thread otherwise).
    Dw(CpuWork),
    /// The main thread waits for the background queue.
    Join,
}

/// A step's kernels and tasks.
#[derive(Clone, Debug)]
pub struct Plan {
    pub label: String,
    pub kernels: Vec<KernelWork>,
    pub tasks: Vec<Task>,
    /// Weight gradients run on the background queue.
    pub async_dw: bool,
    /// Kernels compiled after every optimizer step (the static pipelines).
    pub recompiled_kernels: usize,
    /// The recompile overlaps training (double-buffered) instead of blocking it.
    pub background_compile: bool,
}

/// The shape of the step to plan.
#[derive(Clone, Debug)]
pub struct StepShape {
    pub config: Config,
    pub batch: usize,
    pub seq: usize,
    pub dialect: Dialect,
    /// Micro-batches per optimizer step (`--accum`; the seed uses 10). Only staged weights
    /// depend on it: the step time is that of one micro-batch.
    pub accum: usize,
}

impl StepShape {
    fn tokens(&self) -> usize {
        self.batch * self.seq
    }
    fn dims(&self) -> LayerDims {
        LayerDims::of(&self.config)
    }
}

/// Builds a plan step by step: kernels are added once and evaluated by index.
struct Builder {
    kernels: Vec<KernelWork>,
    tasks: Vec<Task>,
    /// Weight blocks stay in per-layer surfaces ([`Fusion::StagedWeights`]).
    staged: bool,
}

impl Builder {
    fn kernel(&mut self, w: KernelWork) -> usize {
        self.kernels.push(w);
        self.kernels.len() - 1
    }
    /// An evaluation with the CPU's copies into and out of its surfaces around it.
    fn eval(&mut self, k: usize) {
        self.tasks.push(Task::Eval(k));
        self.tasks.push(Task::Cpu("surface_io", self.kernels[k].cpu_copy(self.staged)));
    }
    fn cpu(&mut self, phase: &'static str, w: CpuWork) {
        self.tasks.push(Task::Cpu(phase, w));
    }
    fn dw(&mut self, work: CpuWork) {
        self.tasks.push(Task::Dw(work));
    }
}

/// The plan of one step of `pipeline` with `fusions`.
pub fn plan(shape: &StepShape, pipeline: PipelineConfig, fusions: &Fusions) -> mil::Result<Plan> {
    let applies = |f: Fusion| fusions.contains(&f) && f.not_applicable(pipeline).is_none();
    let staged = applies(Fusion::StagedWeights);
    let mut b = Builder { kernels: Vec::new(), tasks: Vec::new(), staged };
    let (mut recompiled_kernels, mut background_compile) = (0, false);
    match pipeline.kind {
        PipelineKind::Dynamic => dynamic_plan(
            &mut b,
            shape,
            applies(Fusion::RmsNorm),
            applies(Fusion::Classifier),
            applies(Fusion::FewerKernels),
        )?,
        PipelineKind::Static | PipelineKind::DoubleBuffer => {
            recompiled_kernels = static_plan(&mut b, shape, pipeline.ane_extras, applies(Fusion::WoT))?;
            if applies(Fusion::ConvWeights) {
                b.kernels = b.kernels.into_iter().map(KernelWork::with_convs).collect();
            }
            background_compile = pipeline.kind == PipelineKind::DoubleBuffer;
        }
    }
    if staged {
        // Every layer's weights into its surfaces once per optimizer step, shared by the
        // step's micro-batches.
        let per_step: f64 = b
            .tasks
            .iter()
            .filter_map(|t| match t {
                Task::Eval(k) => Some(b.kernels[*k].weight_elements * (F32 + b.kernels[*k].surface_elem_bytes)),
                _ => None,
            })
            .sum();
        b.tasks.insert(0, Task::Cpu("surface_io", CpuWork::stream(per_step / shape.accum.max(1) as f64)));
    }
    let async_dw = applies(Fusion::AsyncDw);
    if async_dw {
        b.tasks.push(Task::Join);
    }
    let names: Vec<&str> = fusions.iter().filter(|f| applies(**f)).map(|f| f.name()).collect();
    let label =
        if names.is_empty() { pipeline.label() } else { format!("{} + {}", pipeline.label(), names.join(" + ")) };
    Ok(Plan { label, kernels: b.kernels, tasks: b.tasks, async_dw, recompiled_kernels, background_compile })
}

/// Streamed bytes of the CPU's elementwise passes, per `[C, T]` fp32 activation.
mod passes {
    /// RMSNorm forward: read x twice (sum of squares, scale), write xn.
    pub const RMSNORM_FWD: f64 = 3.0;
    /// RMSNorm backward: read dy, x twice, read-modify-write dx.
    pub const RMSNORM_BWD: f64 = 5.0;
    /// Residual add, or a copy with its read: read two, write one.
    pub const RESIDUAL: f64 = 3.0;
    /// RoPE: read and write.
    pub const ROPE: f64 = 2.0;
    /// Softmax with cross-entropy over the logits: max, exp and sum, normalise and write
    /// the gradient.
    pub const SOFTMAX_CE: f64 = 4.0;
    /// Turning device probabilities into the logits' gradient: scale, subtract one-hot.
    pub const PROBS_TO_GRAD: f64 = 2.0;
}

fn dynamic_plan(b: &mut Builder, s: &StepShape, fuse_norm: bool, cls_on_ane: bool, merge_qkv: bool) -> mil::Result<()> {
    let (d, t, dialect) = (s.dims(), s.tokens(), s.dialect);
    let (dim, kv) = (d.dim as f64, d.kv_dim() as f64);
    let tf = t as f64;
    let act = |c: f64, passes: f64| CpuWork::stream(passes * c * tf * F32);

    let mut qkv_fwd = KernelWork::of(&kernels::qkv_forward(&d, t, dialect)?);
    let attn_fwd = KernelWork::of(&kernels::attention_forward(&d, s.batch, s.seq, dialect)?);
    let mut ffn_fwd = KernelWork::of(&kernels::ffn_forward(&d, t, dialect)?);
    let ffn_bwd = KernelWork::of(&kernels::ffn_backward(&d, t, dialect)?);
    let attn_bwd = KernelWork::of(&kernels::attention_backward(&d, s.batch, s.seq, dialect)?);
    let qkv_bwd = KernelWork::of(&kernels::qkv_backward(&d, t, dialect)?);
    let elem = qkv_fwd.surface_elem_bytes;
    if fuse_norm {
        // The static pipeline's RMSNorm program supplies the norm: its input x replaces
        // the normed block xn, and its outputs (xn, r) stay outputs, since the weight
        // gradients need xn.
        let norm = KernelWork::of(&sk::rmsnorm(d.dim, t, s.config.norm_eps, &vec![1.0; d.dim], dialect)?);
        qkv_fwd = qkv_fwd.fused("qkv_forward+rmsnorm", &norm, dim * tf * elem, 0.0);
        ffn_fwd = ffn_fwd.fused("ffn_forward+rmsnorm", &norm, dim * tf * elem, 0.0);
    }
    // RoPE inside a merged kernel: the static kernels' elementwise rotation, about ten
    // operations per element of q and k.
    let rope =
        KernelWork { elementwise_ops: 10.0 * (dim + kv) * tf, surface_elem_bytes: elem, ..KernelWork::default() };
    // q, k, v (or dq, dk, dv) no longer come back in; they still go out (the backward and
    // the CPU's dW need them).
    let qkv_block = (dim + 2.0 * kv) * tf * elem;
    let (fwd_first, fwd_second) = if merge_qkv {
        let merged = attn_fwd.fused("qkv+attention_forward", &qkv_fwd, qkv_block, 0.0);
        (b.kernel(merged.fused("qkv+attention_forward", &rope, 0.0, 0.0)), None)
    } else {
        (b.kernel(qkv_fwd), Some(b.kernel(attn_fwd)))
    };
    let ffn_fwd = b.kernel(ffn_fwd);
    let ffn_bwd = b.kernel(ffn_bwd);
    let (bwd_first, bwd_second) = if merge_qkv {
        let merged = attn_bwd.fused("attention+qkv_backward", &qkv_bwd, qkv_block, 0.0);
        (b.kernel(merged.fused("attention+qkv_backward", &rope, 0.0, 0.0)), None)
    } else {
        (b.kernel(attn_bwd), Some(b.kernel(qkv_bwd)))
    };

    b.cpu("other", act(dim, 2.0)); // embedding
    for _ in 0..s.config.n_layers {
        b.cpu("other", act(dim, 2.0)); // x_in = x
        if !fuse_norm {
            b.cpu("rmsnorm", act(dim, passes::RMSNORM_FWD));
        }
        b.eval(fwd_first);
        if let Some(attn) = fwd_second {
            b.cpu("other", act(dim + kv, passes::ROPE));
            b.eval(attn);
        }
        b.cpu("other", act(dim, passes::RESIDUAL));
        if !fuse_norm {
            b.cpu("rmsnorm", act(dim, passes::RMSNORM_FWD));
        }
        b.eval(ffn_fwd);
        b.cpu("other", act(dim, passes::RESIDUAL));
    }
    b.cpu("rmsnorm", act(dim, passes::RMSNORM_FWD)); // final norm
    classifier(b, s, cls_on_ane)?;
    b.cpu("rmsnorm", act(dim, passes::RMSNORM_BWD));
    let layer_dw = LayerDw::new(&d, t);
    for _ in 0..s.config.n_layers {
        b.eval(ffn_bwd);
        b.cpu("other", act(dim, 2.0)); // dy kept for the FFN's dW
        b.dw(layer_dw.ffn);
        b.cpu("rmsnorm", act(dim, passes::RMSNORM_BWD));
        b.eval(bwd_first);
        b.dw(layer_dw.wo);
        if let Some(qkv) = bwd_second {
            b.cpu("other", act(dim + kv, passes::ROPE));
            b.eval(qkv);
        }
        b.dw(layer_dw.qkv);
        b.cpu("rmsnorm", act(dim, passes::RMSNORM_BWD));
    }
    b.cpu("other", act(dim, 2.0)); // embedding backward
    Ok(())
}

/// The plan of one LoRA step ([`crate::lora_pipeline::LoraPipeline`]): per layer the
/// attention and FFN forward kernels (base baked, adapters in the surface), then from the
/// top the FFN backward, the FFN group's gradient kernel, `Woᵀ`, the weight-free attention
/// backward, the QKV backward and the attention group's gradient kernel, with the CPU's
/// residuals and RMSNorm backwards between; the classifier gives its loss and `dx` only
/// (two GEMMs, no `dWcls`); no weight gradient anywhere; layer 0 stops below its
/// adapters' gradients. Every layer's kernels have the same work, so one of each kind is
/// priced. AdamW over the adapters is left out, as [`plan`] leaves out the full one.
pub fn lora_plan(shape: &StepShape, lora: &crate::lora::LoraConfig) -> mil::Result<Plan> {
    use crate::lora::LoraTarget;
    use crate::lora_kernels as lk;
    let (d, t, dialect) = (shape.dims(), shape.tokens(), shape.dialect);
    let (dim, kv, hid, vocab) = (d.dim, d.kv_dim(), d.hidden, shape.config.vocab_size);
    let act = |c: usize, passes: f64| CpuWork::stream(passes * (c * t) as f64 * F32);
    // Zero weights: the work read from a program does not depend on the baked values.
    let z = |n: usize| vec![0.0f32; n];
    let (rms, wq, wkv, wo) = (z(dim), z(dim * dim), z(kv * dim), z(dim * dim));
    let (w13, w2) = (z(hid * dim), z(dim * hid));
    let aw = sk::AttentionWeights { rms: &rms, wq: &wq, wk: &wkv, wv: &wkv, wo: &wo, bias: None };
    let fw = sk::FfnWeights { rms: &rms, w1: &w13, w2: &w2, w3: &w13 };
    let ad = lk::Adapters::new(&lora.targets, lora.rank).with_dropout(lora.dropout > 0.0);
    let eps = shape.config.norm_eps;
    let mut b = Builder { kernels: Vec::new(), tasks: Vec::new(), staged: false };
    let attn_fwd =
        b.kernel(KernelWork::of(&lk::attention_forward(&d, shape.batch, shape.seq, eps, &aw, &ad, dialect)?));
    let ffn_fwd = b.kernel(KernelWork::of(&lk::ffn_forward(&d, t, eps, &fw, &ad, dialect)?));
    let ffn_bwd = b.kernel(KernelWork::of(&lk::ffn_backward(&d, t, &fw, &ad, dialect)?));
    let wo_bwd = b.kernel(KernelWork::of(&lk::attention_backward_wo(&d, t, &wo, &ad, dialect)?));
    let free_bwd = b.kernel(KernelWork::of(&sk::attention_backward_free(&d, shape.batch, shape.seq, dialect)?));
    let qkv_bwd = b.kernel(KernelWork::of(&lk::qkv_backward(&d, t, &aw, &ad, dialect)?));
    let (attn, ffn): (Vec<LoraTarget>, Vec<LoraTarget>) = lora.targets.iter().partition(|t| t.is_attention());
    let mut grads = |group: &[LoraTarget]| -> mil::Result<Option<usize>> {
        if group.is_empty() {
            return Ok(None);
        }
        let def = lk::adapter_grads(&d, t, &lk::Adapters { targets: group, ..ad }, dialect)?;
        Ok(Some(b.kernel(KernelWork::of(&def))))
    };
    let (grads_attn, grads_ffn) = (grads(&attn)?, grads(&ffn)?);
    let qkv_adapted = attn.iter().any(|t| *t != LoraTarget::O);

    b.cpu("other", act(dim, 2.0)); // embedding
    for _ in 0..shape.config.n_layers {
        b.cpu("other", act(dim, 2.0)); // x_in = x
        b.eval(attn_fwd);
        b.cpu("other", act(dim, passes::RESIDUAL));
        b.eval(ffn_fwd);
        b.cpu("other", act(dim, passes::RESIDUAL));
    }
    b.cpu("rmsnorm", act(dim, passes::RMSNORM_FWD)); // final norm
    let vt = (vocab * t) as f64;
    let classifier = CpuWork::gemm(vocab, t, dim, false)
        .plus(CpuWork::gemm(dim, t, vocab, false))
        .plus(CpuWork::stream(passes::SOFTMAX_CE * vt * F32));
    b.cpu("classifier", classifier);
    b.cpu("rmsnorm", act(dim, passes::RMSNORM_BWD));
    for l in (0..shape.config.n_layers).rev() {
        b.eval(ffn_bwd);
        if let Some(k) = grads_ffn {
            b.eval(k);
        }
        if l == 0 && attn.is_empty() {
            break;
        }
        b.cpu("rmsnorm", act(dim, passes::RMSNORM_BWD));
        if l > 0 || qkv_adapted {
            b.eval(wo_bwd);
            b.eval(free_bwd);
            if l > 0 {
                b.eval(qkv_bwd);
            }
        }
        if let Some(k) = grads_attn {
            b.eval(k);
        }
        if l == 0 {
            break;
        }
        b.cpu("rmsnorm", act(dim, passes::RMSNORM_BWD));
    }
    let label =
        format!("lora r={} ({})", lora.rank, lora.targets.iter().map(|t| t.name()).collect::<Vec<_>>().join(","));
    Ok(Plan {
        label,
        kernels: b.kernels,
        tasks: b.tasks,
        async_dw: false,
        recompiled_kernels: 0,
        background_compile: false,
    })
}

/// AdamW over the `n` trainable values of a LoRA run, ms on `chip` (as [`optimizer_ms`]).
pub fn lora_optimizer_ms(n: usize, chip: &Chip) -> f64 {
    chip.cpu_ms(&CpuWork::stream(7.0 * n as f64 * F32))
}

/// One layer's weight gradients, `dW [out, in] += dy [out, T] · xᵀ [T, in]`, in the
/// three groups the pipelines run them in.
struct LayerDw {
    ffn: CpuWork,
    wo: CpuWork,
    qkv: CpuWork,
}

impl LayerDw {
    fn new(d: &LayerDims, t: usize) -> LayerDw {
        let (dim, kv, hid) = (d.dim, d.kv_dim(), d.hidden);
        let g = |out, inp| CpuWork::gemm(out, inp, t, true);
        LayerDw {
            ffn: g(dim, hid).plus(g(hid, dim)).plus(g(hid, dim)),
            wo: g(dim, dim),
            qkv: g(dim, dim).plus(g(kv, dim)).plus(g(kv, dim)),
        }
    }
}

/// The classifier's GEMMs on the CPU: logits `[V, T] = W [V, D] · xn` (unless the ANE
/// did it), `dx [D, T] = Wᵀ · dlogits` and `dW [V, D] += dlogits · xnᵀ`.
fn classifier_gemms(vocab: usize, dim: usize, t: usize, forward: bool) -> CpuWork {
    let backward = CpuWork::gemm(dim, t, vocab, false).plus(CpuWork::gemm(vocab, dim, t, true));
    if forward {
        backward.plus(CpuWork::gemm(vocab, t, dim, false))
    } else {
        backward
    }
}

/// The classifier and loss of the dynamic pipeline: on the CPU (logits, softmax with
/// cross-entropy, `dx` and `dWcls`: three GEMMs), or with the classifier fusion its
/// forward and softmax as ANE kernels (one per vocabulary part) and the backward GEMMs on
/// the CPU.
fn classifier(b: &mut Builder, s: &StepShape, on_ane: bool) -> mil::Result<()> {
    let (dim, vocab, t) = (s.config.dim, s.config.vocab_size, s.tokens());
    let vt = (vocab * t) as f64;
    if on_ane {
        for r in sk::vocab_chunks(vocab, mil::lint::MAX_DIMENSION) {
            let k = b.kernel(KernelWork::of(&classifier_softmax_dynamic(dim, r.len(), t, s.dialect)?));
            b.eval(k);
        }
        let grad = CpuWork::stream(passes::PROBS_TO_GRAD * vt * F32);
        b.cpu("classifier", classifier_gemms(vocab, dim, t, false).plus(grad));
    } else {
        let loss = CpuWork::stream(passes::SOFTMAX_CE * vt * F32);
        b.cpu("classifier", classifier_gemms(vocab, dim, t, true).plus(loss));
    }
    Ok(())
}

/// The classifier fusion's kernel, for pricing: `softmax(W_p · xn)` over a vocabulary part
/// of `part` rows, the weights in the input surface as every dynamic kernel takes them
/// (`kernels::classifier_part` plus a softmax over the vocabulary axis). Not yet used by a
/// pipeline (issue 25, part 3).
pub fn classifier_softmax_dynamic(dim: usize, part: usize, t: usize, dialect: Dialect) -> mil::Result<KernelDef> {
    let mut g = Gen::new(dialect);
    g.surface("x", dim, &[("xn", dim, t), ("wcls", dim, part)]);
    let xn = g.block("xn");
    let w = g.block("wcls");
    let logits = g.linear_t("logits", &w, &xn); // [1, 1, V_p, T]
    let probs = g.b.softmax("probs2", &logits, 2);
    g.output("probs", &probs);
    g.finish("classifier_softmax")
}

/// The static (and double-buffered) pipeline's step; returns the kernels recompiled per
/// optimizer step.
fn static_plan(b: &mut Builder, s: &StepShape, extras: bool, fuse_wo: bool) -> mil::Result<usize> {
    let (d, t, dialect, eps) = (s.dims(), s.tokens(), s.dialect, s.config.norm_eps);
    let (dim, kv, vocab) = (d.dim, d.kv_dim(), s.config.vocab_size);
    let act = |c: usize, passes: f64| CpuWork::stream(passes * (c * t) as f64 * F32);
    // One layer's weights, zeros: the programs' shapes do not depend on the values.
    let zeros = |n: usize| vec![0.0f32; n];
    let (gain, wq, wkv, w1) = (zeros(dim), zeros(dim * dim), zeros(kv * dim), zeros(d.hidden * dim));
    let aw = sk::AttentionWeights { rms: &gain, wq: &wq, wk: &wkv, wv: &wkv, wo: &wq, bias: None };
    let fw = sk::FfnWeights { rms: &gain, w1: &w1, w2: &w1, w3: &w1 };

    let attn_fwd = b.kernel(KernelWork::of(&sk::attention_forward(&d, s.batch, s.seq, eps, &aw, dialect)?));
    let ffn_fwd = b.kernel(KernelWork::of(&sk::ffn_forward(&d, t, eps, &fw, dialect)?));
    let ffn_bwd = b.kernel(KernelWork::of(&sk::ffn_backward(&d, t, &fw, dialect)?));
    let wo = KernelWork::of(&sk::attention_backward_wo(&d, t, aw.wo, dialect)?);
    let free = KernelWork::of(&sk::attention_backward_free(&d, s.batch, s.seq, dialect)?);
    let (attn_bwd_first, attn_bwd_second) = if fuse_wo {
        // d_o stays inside: out of the Woᵀ kernel and into the weight-free one.
        let d_o = (dim * t) as f64 * free.surface_elem_bytes;
        (b.kernel(free.fused("attention_backward_wo+free", &wo, d_o, d_o)), None)
    } else {
        (b.kernel(wo), Some(b.kernel(free)))
    };
    let qkv_bwd = b.kernel(KernelWork::of(&sk::qkv_backward(&d, t, &aw, dialect)?));
    let extras_kernels = if extras {
        let norm = b.kernel(KernelWork::of(&sk::rmsnorm(dim, t, eps, &gain, dialect)?));
        let chunks = sk::vocab_chunks(vocab, mil::lint::MAX_DIMENSION);
        let with_lse = chunks.len() > 1;
        let mut cls = Vec::new();
        for r in &chunks {
            let rows = zeros(r.len() * dim);
            cls.push(b.kernel(KernelWork::of(&sk::classifier_softmax(dim, t, r.len(), &rows, with_lse, dialect)?)));
        }
        let norm_bwd = b.kernel(KernelWork::of(&sk::rmsnorm_backward(dim, t, eps, dialect)?));
        Some((norm, cls, norm_bwd))
    } else {
        None
    };
    // An RMSNorm backward: on the device with the extras (and the CPU adds its dx, dgain
    // in), else on the CPU.
    let norm_backward = |b: &mut Builder| match &extras_kernels {
        Some((_, _, k)) => {
            b.eval(*k);
            b.cpu("rmsnorm", act(dim, passes::RESIDUAL));
        }
        None => b.cpu("rmsnorm", act(dim, passes::RMSNORM_BWD)),
    };

    b.cpu("other", act(dim, 2.0)); // embedding
    for _ in 0..s.config.n_layers {
        b.cpu("other", act(dim, 2.0)); // x_in = x
        b.eval(attn_fwd);
        b.cpu("other", act(dim, passes::RESIDUAL));
        b.eval(ffn_fwd);
        b.cpu("other", act(dim, passes::RESIDUAL));
    }
    let vt = (vocab * t) as f64;
    match &extras_kernels {
        Some((norm, cls, _)) => {
            b.eval(*norm);
            for k in cls {
                b.eval(*k);
            }
            let grad = CpuWork::stream(passes::PROBS_TO_GRAD * vt * F32);
            b.cpu("classifier", classifier_gemms(vocab, dim, t, false).plus(grad));
        }
        None => {
            b.cpu("rmsnorm", act(dim, passes::RMSNORM_FWD));
            let loss = CpuWork::stream(passes::SOFTMAX_CE * vt * F32);
            b.cpu("classifier", classifier_gemms(vocab, dim, t, true).plus(loss));
        }
    }
    norm_backward(b);
    let layer_dw = LayerDw::new(&d, t);
    for _ in 0..s.config.n_layers {
        b.eval(ffn_bwd);
        b.dw(layer_dw.ffn);
        norm_backward(b);
        b.eval(attn_bwd_first);
        b.dw(layer_dw.wo);
        if let Some(k) = attn_bwd_second {
            b.eval(k);
        }
        b.eval(qkv_bwd);
        b.dw(layer_dw.qkv);
        norm_backward(b);
    }
    b.cpu("other", act(dim, 2.0)); // embedding backward
    let set =
        5 * s.config.n_layers + if extras { 1 + sk::vocab_chunks(vocab, mil::lint::MAX_DIMENSION).len() } else { 0 };
    Ok(set)
}

// --- Prediction ------------------------------------------------------------------------

/// One kernel's row of a prediction.
#[derive(Clone, Debug)]
pub struct KernelRow {
    pub work: KernelWork,
    pub evals: usize,
    pub time: KernelTime,
}

impl KernelRow {
    pub fn total_ms(&self) -> f64 {
        self.evals as f64 * self.time.total_ms()
    }
}

/// A predicted step.
#[derive(Clone, Debug)]
pub struct Prediction {
    pub label: String,
    pub chip: Chip,
    /// Forward and backward of one step, as the seed reports ms/step: the optimizer and
    /// compiles left out.
    pub ms_per_step: f64,
    pub kernels: Vec<KernelRow>,
    /// Main-thread time per phase (`ane` = waiting for kernels; `dw_wait` = for the
    /// background queue), ms.
    pub main_ms: BTreeMap<&'static str, f64>,
    /// Work the background queue did (async dW), ms.
    pub background_ms: f64,
    /// ANE FLOPs of one step.
    pub ane_flops: f64,
    /// CPU GEMM FLOPs of one step (classifier, weight gradients).
    pub cpu_gemm_flops: f64,
    pub evals: usize,
    /// Compile time per optimizer step (static pipelines); blocking or in the background.
    pub compile_ms: f64,
    pub background_compile: bool,
}

impl Prediction {
    /// Share of the ANE's peak: its FLOPs over the step time.
    pub fn fraction_of_peak(&self) -> f64 {
        self.ane_flops / (self.ms_per_step * 1e-3) / (self.chip.ane_tflops * 1e12)
    }

    /// Time the ANE is busy.
    pub fn ane_ms(&self) -> f64 {
        self.kernels.iter().map(KernelRow::total_ms).sum()
    }

    /// The step's critical path in words: the main thread's time by what it waits for.
    pub fn critical_path(&self) -> String {
        let mut parts: Vec<(&str, f64)> = self.main_ms.iter().map(|(k, v)| (*k, *v)).collect();
        parts.sort_by(|a, b| b.1.total_cmp(&a.1));
        let body: Vec<String> = parts
            .iter()
            .filter(|(_, v)| *v > 0.0)
            .map(|(k, v)| format!("{k} {v:.1} ms ({:.0} %)", 100.0 * v / self.ms_per_step))
            .collect();
        format!("main thread: {}", body.join(" + "))
    }
}

/// Simulates `plan` on `chip`.
pub fn predict(plan: &Plan, chip: &Chip) -> Prediction {
    let times: Vec<KernelTime> = plan.kernels.iter().map(|k| chip.kernel_time(k)).collect();
    let mut evals = vec![0usize; plan.kernels.len()];
    let mut main: BTreeMap<&'static str, f64> = PHASES.iter().map(|p| (*p, 0.0)).collect();
    let (mut now, mut queue_free, mut background, mut cpu_gemm_flops) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for task in &plan.tasks {
        match task {
            Task::Eval(k) => {
                evals[*k] += 1;
                let ms = times[*k].total_ms();
                now += ms;
                *main.get_mut("ane").expect("a phase") += ms;
            }
            Task::Cpu(phase, w) => {
                cpu_gemm_flops += w.gemm_flops;
                let ms = chip.cpu_ms(w);
                now += ms;
                *main.entry(phase).or_default() += ms;
            }
            Task::Dw(w) => {
                cpu_gemm_flops += w.gemm_flops;
                let ms = chip.cpu_ms(w);
                if plan.async_dw {
                    let start = now.max(queue_free);
                    queue_free = start + ms;
                    background += ms;
                } else {
                    now += ms;
                    *main.get_mut("dw").expect("a phase") += ms;
                }
            }
            Task::Join => {
                let wait = (queue_free - now).max(0.0);
                now += wait;
                *main.entry("dw_wait").or_default() += wait;
            }
        }
    }
    let kernels: Vec<KernelRow> = plan
        .kernels
        .iter()
        .zip(&times)
        .zip(&evals)
        .map(|((w, t), &n)| KernelRow { work: w.clone(), evals: n, time: *t })
        .collect();
    let ane_flops = kernels.iter().map(|r| r.evals as f64 * r.work.flops()).sum();
    let compile_ms = plan.recompiled_kernels as f64 * chip.compile_ms_per_kernel;
    let mut ms_per_step = now;
    if plan.background_compile && compile_ms > ms_per_step {
        // Double-buffered: the step waits for the set compiling behind it.
        *main.entry("compile_stall").or_default() += compile_ms - ms_per_step;
        ms_per_step = compile_ms;
    }
    Prediction {
        label: plan.label.clone(),
        chip: chip.clone(),
        ms_per_step,
        evals: evals.iter().sum(),
        kernels,
        main_ms: main,
        background_ms: background,
        ane_flops,
        cpu_gemm_flops,
        compile_ms,
        background_compile: plan.background_compile,
    }
}

/// AdamW over every parameter, ms on `chip`: parameters, gradients and two moments read,
/// three of them written, fp32 (not in [`Prediction::ms_per_step`]: the seed's figures
/// leave the optimizer out, and it runs once per `--accum` micro-batches).
pub fn optimizer_ms(config: &Config, chip: &Chip) -> f64 {
    chip.cpu_ms(&CpuWork::stream(7.0 * config.n_params() as f64 * F32))
}

/// Each fusion added alone to `pipeline` as anetrain runs it: `(fusion, ms/step with
/// it)`, `None` where it does not apply.
pub fn fusion_gains(
    shape: &StepShape,
    pipeline: PipelineConfig,
    chip: &Chip,
) -> mil::Result<Vec<(Fusion, Option<f64>)>> {
    let mut out = Vec::new();
    for f in Fusion::ALL {
        if f.not_applicable(pipeline).is_some() {
            out.push((f, None));
            continue;
        }
        let with: Fusions = [f].into_iter().collect();
        out.push((f, Some(predict(&plan(shape, pipeline, &with)?, chip).ms_per_step)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(config: Config) -> StepShape {
        StepShape { config, batch: 1, seq: 64, dialect: Dialect::Ios18, accum: 1 }
    }

    /// FLOPs and bytes read from a program equal the hand count of the same matmul.
    #[test]
    fn a_kernels_flops_and_bytes_come_from_its_program() {
        let d = LayerDims::new(64, 172, 4, 2);
        let t = 32;
        let w = KernelWork::of(&kernels::qkv_forward(&d, t, Dialect::Ios18).unwrap());
        let out = d.dim + 2 * d.kv_dim();
        assert_eq!(w.matmul_flops, (2 * d.dim * out * t) as f64);
        // One fp32 input [64, padded(32 + 128)], outputs q, k, v.
        let width = device::padded_width(t + out);
        assert_eq!(w.input_bytes, (4 * d.dim * width) as f64);
        assert_eq!(w.output_bytes, (4 * out * t) as f64);
        assert_eq!(w.const_bytes, 0.0);
        // ios16: the same in fp16, and no casts.
        let h = KernelWork::of(&kernels::qkv_forward(&d, t, Dialect::Ios16).unwrap());
        assert_eq!(h.input_bytes * 2.0, w.input_bytes);
        assert!(h.elementwise_ops < w.elementwise_ops, "the fp32 kernel casts, the fp16 one does not");
    }

    /// A matmul against a transposed operand takes its inner dimension from the right axis.
    #[test]
    fn attention_scores_count_the_head_dimension() {
        let d = LayerDims::new(64, 172, 4, 4);
        let (batch, seq) = (2, 16);
        let w = KernelWork::of(&kernels::attention_forward(&d, batch, seq, Dialect::Ios16).unwrap());
        let hd = d.head_dim();
        // scores [B, h, S, S] over hd, P·V [B, h, S, hd] over S, Wo [D, T] over D.
        let scores = 2 * batch * d.n_heads * seq * seq * hd;
        let pv = 2 * batch * d.n_heads * seq * hd * seq;
        let wo = 2 * d.dim * batch * seq * d.dim;
        assert_eq!(w.matmul_flops, (scores + pv + wo) as f64);
        // The causal mask is baked: 64-byte header + chunk header + fp16 payload.
        assert_eq!(w.const_bytes, (128 + 2 * seq * seq) as f64);
    }

    #[test]
    fn a_kernels_time_is_its_bound_plus_the_dispatch() {
        let chip = Chip::named("m4").unwrap();
        let w = KernelWork { matmul_flops: 1e9, input_bytes: 1e6, surface_elem_bytes: 4.0, ..Default::default() };
        let t = chip.kernel_time(&w);
        let compute = 1e9 * MATMUL_SLOWDOWN / (chip.ane_tflops * 1e12) * 1e3;
        assert!((t.compute_ms - compute).abs() < 1e-12);
        assert!((t.total_ms() - (compute.max(1e6 / 120e9 * 1e3) + DISPATCH_MS)).abs() < 1e-12);
        assert!(!t.spilled);
        // Past the SRAM cliff, compute slows down.
        let big = KernelWork { const_bytes: 2.0 * SRAM_CLIFF_BYTES, ..w };
        let tb = chip.kernel_time(&big);
        assert!(tb.spilled);
        assert!((tb.compute_ms - SPILL_SLOWDOWN * compute).abs() < 1e-12);
    }

    /// The dynamic plan evaluates 6 kernels per layer; the static one 6 per layer too (5
    /// weight-bearing + the weight-free attention backward), 5 with the Woᵀ fusion.
    #[test]
    fn plans_count_the_pipelines_evaluations() {
        let config = llama::Config::preset("tiny").unwrap();
        let l = config.n_layers;
        let s = shape(config);
        let chip = Chip::named("m4").unwrap();
        let none = Fusions::new();
        let count = |p: PipelineConfig, f: &Fusions| predict(&plan(&s, p, f).unwrap(), &chip).evals;
        assert_eq!(count(PipelineConfig::new(PipelineKind::Dynamic, false), &none), 6 * l);
        assert_eq!(count(PipelineConfig::new(PipelineKind::Static, false), &none), 6 * l);
        let wo: Fusions = [Fusion::WoT].into_iter().collect();
        assert_eq!(count(PipelineConfig::new(PipelineKind::Static, false), &wo), 5 * l);
        let fewer: Fusions = [Fusion::FewerKernels].into_iter().collect();
        assert_eq!(count(PipelineConfig::new(PipelineKind::Dynamic, false), &fewer), 4 * l);
        // Extras: + final norm, one classifier chunk, 2L + 1 norm backwards.
        assert_eq!(count(PipelineConfig::new(PipelineKind::Static, true), &none), 6 * l + 2 + 2 * l + 1);
        let cls: Fusions = [Fusion::Classifier].into_iter().collect();
        assert_eq!(count(PipelineConfig::new(PipelineKind::Dynamic, false), &cls), 6 * l + 1);
    }

    /// Async dW never makes a step slower, and hides at most the dW time.
    #[test]
    fn async_dw_overlaps_at_most_the_weight_gradients() {
        let s = shape(llama::Config::preset("stories15m").unwrap());
        let p = PipelineConfig::new(PipelineKind::Dynamic, false);
        for chip in chip_names() {
            let chip = Chip::named(chip).unwrap();
            let sync = predict(&plan(&s, p, &Fusions::new()).unwrap(), &chip);
            let asyn = predict(&plan(&s, p, &[Fusion::AsyncDw].into_iter().collect()).unwrap(), &chip);
            assert!(asyn.ms_per_step <= sync.ms_per_step + 1e-9, "{}", chip.name);
            assert!(sync.ms_per_step - asyn.ms_per_step <= sync.main_ms["dw"] + 1e-9, "{}", chip.name);
            assert!((asyn.background_ms - sync.main_ms["dw"]).abs() < 1e-9);
        }
    }

    #[test]
    fn fusions_parse_by_name_and_unknown_ones_are_named() {
        assert_eq!(parse_fusions("none").unwrap(), Fusions::new());
        assert_eq!(parse_fusions("all").unwrap().len(), Fusion::ALL.len());
        let two = parse_fusions("rmsnorm, async-dw").unwrap();
        assert_eq!(two, [Fusion::RmsNorm, Fusion::AsyncDw].into_iter().collect());
        let e = parse_fusions("rmsnorm,flash").unwrap_err();
        assert!(e.contains("`flash`") && e.contains("async-dw"), "{e}");
    }

    #[test]
    fn a_cpu_probe_report_does_not_describe_a_chip() {
        let report = device::probe::ProbeReport {
            anetrain_version: "0".into(),
            os: "linux".into(),
            arch: "x86_64".into(),
            machine: "x".into(),
            device: "cpu".into(),
            dialect: "ios18".into(),
            precision: "fp32".into(),
            results: vec![],
        };
        let e = Chip::named("m4").unwrap().with_probe(&report, "p.json").unwrap_err();
        assert!(e.contains("p.json") && e.contains("`cpu`"), "{e}");
    }
}
