//! The characterisation suite: small experiments that settle, on the machine at hand,
//! what the public ANE reports disagree about or what a pipeline depends on. Each probe
//! returns a [`ProbeResult`] (printable as a table row, serialisable to JSON) so a Mac
//! user can run `anetrain probe --json ane-probes.json` and share the file.
//!
//! Probes that make sense on any device run on any device (the CPU device too): a
//! dynamic-weight matmul checked against a naive matmul, weights baked at compile time,
//! the compile limit (in a child process), compile/eval overlap, dispatch overhead
//! against kernel size, peak throughput of stacked 1×1 convolutions. Probes of ANE
//! mechanisms (QoS, perf stats, the request's `weightsBuffer`, I/O binding order) report
//! [`ProbeStatus::NotApplicable`] elsewhere, with the reason, and are not counted as
//! passed.
//!
//! ```
//! use device::{cpu::CpuDevice, probe, Precision};
//!
//! let cpu = CpuDevice::new(Precision::Fp32);
//! let results = probe::run(&["dynamic-matmul".to_string(), "qos-sweep".to_string()], &cpu, &Default::default()).unwrap();
//! assert_eq!(results[0].status, probe::ProbeStatus::Passed);
//! assert_eq!(results[1].status, probe::ProbeStatus::NotApplicable);
//! let report = probe::ProbeReport::new(&cpu, results);
//! assert!(report.table().contains("dynamic-matmul"));
//! assert_eq!(report.exit_code(), 0);
//! ```

use std::fmt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use mil::builder::FunctionBuilder;
use mil::{DType, Dialect, Program, TensorType, Var};
use serde::{Deserialize, Serialize};

use crate::ane::binding::BindingRules;
use crate::ane::AneDevice;
use crate::{Device, Error, ErrorKind, Kernel, Precision, Surface, Weights};

/// Every probe, in the order `run` runs them, with one line on what it settles.
pub const PROBES: &[(&str, &str)] = &[
    ("dynamic-matmul", "weights packed into the input surface, sliced and multiplied, against a naive matmul"),
    ("weight-reload", "are BLOBFILE constants baked in at compile time, or does a reload pick up new files?"),
    ("weights-buffer", "does the request's weightsBuffer replace the compiled weights? (ANE)"),
    ("io-order", "are several inputs/outputs bound in alphabetical order with equal allocations? (ANE)"),
    (
        "io-convention",
        "which kernel I/O works: one packed input and output, several inputs (declaration or alphabetical \
         order), rank 2, rank 5",
    ),
    ("qos-sweep", "compile, load and eval latency for each QoS class (ANE)"),
    ("perf-stats", "does the device report its own execution time (hwExecutionTime)?"),
    ("compile-limit", "how many programs one process can compile (in a child process)"),
    ("compile-eval-overlap", "does a background compile overlap evaluations on another kernel?"),
    ("dispatch-overhead", "eval latency against kernel size: the fixed cost per dispatch"),
    ("peak", "throughput of stacked 1×1 convolutions, the ANE's best case"),
];

/// How a probe ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProbeStatus {
    /// It ran and what it checked held (or what it measured was measured).
    Passed,
    /// It ran and something was wrong: an error, or a result that does not match.
    Failed,
    /// The probe means nothing on this device (QoS on the CPU); not counted as passed.
    NotApplicable,
    /// It could not run here (no compile budget left, no child command given).
    Unavailable,
}

impl ProbeStatus {
    pub fn name(self) -> &'static str {
        match self {
            ProbeStatus::Passed => "passed",
            ProbeStatus::Failed => "failed",
            ProbeStatus::NotApplicable => "not applicable",
            ProbeStatus::Unavailable => "unavailable",
        }
    }
}

impl fmt::Display for ProbeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A number a probe measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    pub name: String,
    pub value: f64,
    pub unit: String,
}

/// What one probe found.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    pub name: String,
    pub status: ProbeStatus,
    /// One line: the finding, or why the probe failed or did not apply.
    pub summary: String,
    pub measurements: Vec<Measurement>,
    /// Further lines worth keeping (per-size timings, error texts).
    pub notes: Vec<String>,
}

impl ProbeResult {
    fn new(name: &str, status: ProbeStatus, summary: impl Into<String>) -> ProbeResult {
        ProbeResult { name: name.into(), status, summary: summary.into(), measurements: Vec::new(), notes: Vec::new() }
    }

    fn measure(mut self, name: &str, value: f64, unit: &str) -> ProbeResult {
        self.measurements.push(Measurement { name: name.into(), value, unit: unit.into() });
        self
    }

    /// The value of a measurement by name.
    pub fn measurement(&self, name: &str) -> Option<f64> {
        self.measurements.iter().find(|m| m.name == name).map(|m| m.value)
    }
}

/// A probe name `run` does not know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownProbe {
    pub name: String,
}

impl fmt::Display for UnknownProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let known: Vec<&str> = PROBES.iter().map(|(n, _)| *n).collect();
        write!(f, "unknown probe `{}`; the probes are: {}", self.name, known.join(", "))
    }
}

impl std::error::Error for UnknownProbe {}

/// How the compile-limit probe starts its child: a program and arguments that end up
/// calling [`compile_limit_child`] and printing its [`ChildReport::line`] on stdout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// Settings of a probe run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeOptions {
    /// Timed evaluations per measurement (after warm-up ones).
    pub iterations: usize,
    /// How the compile-limit probe runs its child; `None` makes it unavailable (it must
    /// not spend this process's compile budget).
    pub compile_limit_child: Option<ChildCommand>,
}

impl Default for ProbeOptions {
    fn default() -> ProbeOptions {
        ProbeOptions { iterations: 20, compile_limit_child: None }
    }
}

/// Runs the named probes (all of them when `names` is empty) on `device`, in [`PROBES`]
/// order. Unknown names are refused before anything runs. ANE-specific probes report
/// "not applicable" here; use [`run_ane`] for the ANE.
pub fn run(names: &[String], device: &dyn Device, options: &ProbeOptions) -> Result<Vec<ProbeResult>, UnknownProbe> {
    run_with(names, &Ctx { device, ane: None, options })
}

/// [`run`] on the ANE, with the probes that need its own calls (reload, weightsBuffer,
/// QoS, binding rules, perf stats).
pub fn run_ane(names: &[String], ane: &AneDevice, options: &ProbeOptions) -> Result<Vec<ProbeResult>, UnknownProbe> {
    run_with(names, &Ctx { device: ane, ane: Some(ane), options })
}

fn run_with(names: &[String], ctx: &Ctx<'_>) -> Result<Vec<ProbeResult>, UnknownProbe> {
    if let Some(bad) = names.iter().find(|n| !PROBES.iter().any(|(p, _)| p == n)) {
        return Err(UnknownProbe { name: bad.clone() });
    }
    let selected: Vec<&str> =
        PROBES.iter().map(|(n, _)| *n).filter(|n| names.is_empty() || names.iter().any(|m| m == n)).collect();
    Ok(selected.into_iter().map(|name| run_one(name, ctx)).collect())
}

struct Ctx<'a> {
    device: &'a dyn Device,
    ane: Option<&'a AneDevice>,
    options: &'a ProbeOptions,
}

fn run_one(name: &str, ctx: &Ctx<'_>) -> ProbeResult {
    let result = match name {
        "dynamic-matmul" => dynamic_matmul(ctx),
        "weight-reload" => weight_reload(ctx),
        "weights-buffer" => weights_buffer(ctx),
        "io-order" => io_order(ctx),
        "io-convention" => io_convention(ctx),
        "qos-sweep" => qos_sweep(ctx),
        "perf-stats" => perf_stats(ctx),
        "compile-limit" => compile_limit(ctx),
        "compile-eval-overlap" => compile_eval_overlap(ctx),
        "dispatch-overhead" => dispatch_overhead(ctx),
        "peak" => peak(ctx),
        _ => unreachable!("names are checked against PROBES"),
    };
    // A device error inside a probe is the probe's failure, with the device's words;
    // a spent budget means the probe could not run.
    result.unwrap_or_else(|e| {
        let status = if e.kind == ErrorKind::CompileBudget { ProbeStatus::Unavailable } else { ProbeStatus::Failed };
        ProbeResult::new(name, status, first_line(&e.message)).with_notes(&e.message)
    })
}

impl ProbeResult {
    fn with_notes(mut self, text: &str) -> ProbeResult {
        if text.lines().count() > 1 {
            self.notes.extend(text.lines().map(str::to_string));
        }
        self
    }
}

type ProbeOutcome = Result<ProbeResult, Error>;

/// A probe that needs `n` compiles: unavailable if the device cannot do that many.
fn needs_compiles(name: &str, ctx: &Ctx<'_>, n: usize) -> Option<ProbeResult> {
    match ctx.device.compiles_left() {
        Some(left) if left < n => Some(ProbeResult::new(
            name,
            ProbeStatus::Unavailable,
            format!("needs {n} compiles and this process has {left} left; run it in a fresh process"),
        )),
        _ => None,
    }
}

fn not_applicable(name: &str, ctx: &Ctx<'_>, why: &str) -> ProbeOutcome {
    Ok(ProbeResult::new(name, ProbeStatus::NotApplicable, format!("the {} device {why}", ctx.device.name())))
}

// --- Programs ------------------------------------------------------------------------

/// Programs in the device's dialect: fp32 I/O cast to fp16 inside for ios18, fp16 I/O for
/// ios16 (M1/M2 reject `cast`).
struct Gen {
    b: FunctionBuilder,
    io: DType,
    dialect: Dialect,
}

impl Gen {
    fn new(dialect: Dialect) -> Gen {
        let io = if dialect == Dialect::Ios18 { DType::Fp32 } else { DType::Fp16 };
        Gen { b: FunctionBuilder::new("main", dialect), io, dialect }
    }

    /// An input of shape `shape` in the I/O dtype, and its fp16 value to compute with.
    fn input(&mut self, name: &str, shape: &[usize]) -> (Var, Var) {
        let x = self.b.input(name, TensorType::new(self.io, shape.to_vec()));
        let x16 = if self.io == DType::Fp16 { x.clone() } else { self.b.cast(&format!("{name}_16"), &x, DType::Fp16) };
        (x, x16)
    }

    /// Marks `v` (fp16) an output named `name`, cast to the I/O dtype.
    fn output(&mut self, name: &str, v: &Var) -> Var {
        let out = if self.io == DType::Fp16 { self.b.identity(name, v) } else { self.b.cast(name, v, self.io) };
        self.b.output(&out);
        out
    }

    fn finish(self) -> Result<Program, Error> {
        Ok(Program::new(self.dialect, self.b.finish()?))
    }
}

/// Deterministic values in [-1, 1): xorshift64*, enough for test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40; // 24 bits
        bits as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

/// Whether the device rounds what enters a program to fp16: always in fp16 precision;
/// the CPU device in fp32 precision keeps fp32 surfaces exact even through `cast`.
fn rounds_inputs(device: &dyn Device, io: DType) -> bool {
    device.precision() == Precision::Fp16 || io == DType::Fp16
}

/// What the device sees of an f32 value: itself, or rounded to fp16.
fn seen(v: f32, fp16: bool) -> f64 {
    if fp16 {
        half::f16::from_f32(v).to_f64()
    } else {
        v as f64
    }
}

/// Largest |got − want| / (1 + |want|).
fn max_rel_error(got: &[f32], want: &[f64]) -> f64 {
    got.iter().zip(want).map(|(g, w)| (*g as f64 - w).abs() / (1.0 + w.abs())).fold(0.0, f64::max)
}

/// The tolerance for results of sums of `terms` products of values in [-1, 1]: fp16
/// rounding of each partial result where the device rounds, else fp32's.
fn tolerance(device: &dyn Device, terms: usize) -> f64 {
    let eps = match device.precision() {
        Precision::Fp16 => 1.0 / 1024.0,
        Precision::Fp32 => 1.0 / 8_388_608.0,
    };
    4.0 * eps * (terms as f64).sqrt().max(1.0)
}

fn mean_eval_seconds(
    kernel: &mut dyn Kernel,
    inputs: &[&Surface],
    outputs: &mut [&mut Surface],
    n: usize,
) -> Result<f64, Error> {
    kernel.eval(inputs, outputs)?; // warm-up
    let t = Instant::now();
    for _ in 0..n.max(1) {
        kernel.eval(inputs, outputs)?;
    }
    Ok(t.elapsed().as_secs_f64() / n.max(1) as f64)
}

fn zeros_for(vars: &[Var]) -> Vec<Surface> {
    vars.iter().map(|v| Surface::zeros(v.ty.dtype, &v.ty.shape)).collect()
}

// --- dynamic-matmul ------------------------------------------------------------------

/// The dynamic-weight matmul of DESIGN.md: one input `[1, IC, 1, S + OC]` holding the
/// activation `x: [IC, S]` in positions `0..S` and the weight `W: [IC, OC]` after it;
/// output `y: [1, OC, 1, S]` with `y[o, s] = Σ_c x[c, s] · W[c, o]`.
pub fn dynamic_matmul_program(dialect: Dialect, ic: usize, oc: usize, seq: usize) -> Result<Program, Error> {
    let (ic_, oc_, s_) = (ic as i64, oc as i64, seq as i64);
    let mut g = Gen::new(dialect);
    let (_, x) = g.input("x", &[1, ic, 1, seq + oc]);
    let b = &mut g.b;
    let act = b.slice_by_size("act", &x, &[0, 0, 0, 0], &[1, ic_, 1, s_]); // [1, IC, 1, S]
    let w = b.slice_by_size("w", &x, &[0, 0, 0, s_], &[1, ic_, 1, oc_]); // [1, IC, 1, OC]
    let act2 = b.reshape("act2", &act, &[1, 1, ic_, s_]);
    let act_t = b.transpose("act_t", &act2, &[0, 1, 3, 2]); // [1, 1, S, IC]
    let w2 = b.reshape("w2", &w, &[1, 1, ic_, oc_]); // [1, 1, IC, OC]
    let prod = b.matmul("prod", &act_t, &w2, false, false); // [1, 1, S, OC]
    let prod_t = b.transpose("prod_t", &prod, &[0, 1, 3, 2]); // [1, 1, OC, S]
    let y16 = b.reshape("y16", &prod_t, &[1, oc_, 1, s_]);
    g.output("y", &y16);
    g.finish()
}

fn dynamic_matmul(ctx: &Ctx<'_>) -> ProbeOutcome {
    const NAME: &str = "dynamic-matmul";
    // IC and S multiples of 32 and 16, surfaces ≥ 48 KiB even in fp16: lint-clean shapes.
    let (ic, oc, seq) = (128, 96, 256);
    if let Some(r) = needs_compiles(NAME, ctx, 1) {
        return Ok(r);
    }
    let d = ctx.device;
    let program = dynamic_matmul_program(d.dialect(), ic, oc, seq)?;
    let mut kernel = d.compile(&program, &Weights::new())?;
    let mut rng = Rng(0x5eed_0001);
    let act = rng.vec(ic * seq, 1.0); // [IC, S]
    let w = rng.vec(ic * oc, 1.0); // [IC, OC]
    let io = kernel.inputs()[0].ty.dtype;
    let mut x = Surface::zeros(io, &[1, ic, 1, seq + oc]);
    x.write_block(0, 0, ic, seq, &act);
    x.write_block(0, seq, ic, oc, &w);
    let mut y = zeros_for(kernel.outputs());
    kernel.eval(&[&x], &mut y.iter_mut().collect::<Vec<_>>())?;

    // The reference sees what the device sees: inputs rounded to fp16 where it rounds them.
    let r = rounds_inputs(d, io);
    let want: Vec<f64> = (0..oc)
        .flat_map(|o| {
            let (act, w) = (&act, &w);
            (0..seq).map(move |s| (0..ic).map(|c| seen(act[c * seq + s], r) * seen(w[c * oc + o], r)).sum())
        })
        .collect();
    let err = max_rel_error(&y[0].to_f32(), &want);
    let tol = tolerance(d, ic);
    let status = if err <= tol { ProbeStatus::Passed } else { ProbeStatus::Failed };
    Ok(ProbeResult::new(
        NAME,
        status,
        format!(
            "{} a naive matmul: max relative error {err:.2e} (tolerance {tol:.1e}; IC {ic}, OC {oc}, S {seq})",
            if status == ProbeStatus::Passed { "matches" } else { "DIFFERS from" }
        ),
    )
    .measure("max_relative_error", err, "")
    .measure("tolerance", tol, ""))
}

// --- weight-reload and weights-buffer ------------------------------------------------

/// `y = W x` with `W: [C, C, 1, 1]` a BLOBFILE constant, on `[1, C, 1, S]`.
struct ConvCase {
    program: Program,
    x: Surface,
    xs: Vec<f32>,
    /// Whether the device sees `xs` rounded to fp16.
    x_rounded: bool,
    channels: usize,
    seq: usize,
}

impl ConvCase {
    // [1, 64, 1, 384] is 48 KiB in fp16, the reported minimum.
    const CHANNELS: usize = 64;
    const SEQ: usize = 384;

    fn new(device: &dyn Device) -> Result<ConvCase, Error> {
        let (c, s) = (Self::CHANNELS, Self::SEQ);
        let mut g = Gen::new(device.dialect());
        let (_, x) = g.input("x", &[1, c, 1, s]);
        let mut w = Weights::new();
        let wv = g.b.constant("w", w.add_tensor("w", &[c, c, 1, 1], &vec![0.0; c * c]));
        let h = g.b.conv1x1("h", &x, &wv);
        g.output("y", &h);
        let program = g.finish()?;
        let xs = Rng(0x5eed_0002).vec(c * s, 1.0);
        let io = program.main().expect("built").inputs[0].ty.dtype;
        let x_rounded = rounds_inputs(device, io);
        Ok(ConvCase { x: Surface::from_f32(io, &[1, c, 1, s], &xs), program, xs, x_rounded, channels: c, seq: s })
    }

    /// Weights whose output is recognisably theirs: seeded values scaled by `1/√C`.
    fn weights(&self, seed: u64) -> (Weights, Vec<f32>) {
        let c = self.channels;
        let values = Rng(seed).vec(c * c, 1.0 / (c as f32).sqrt());
        let mut w = Weights::new();
        w.add_tensor("w", &[c, c, 1, 1], &values);
        (w, values)
    }

    fn reference(&self, w: &[f32]) -> Vec<f64> {
        let (c, s) = (self.channels, self.seq);
        (0..c)
            .flat_map(|o| {
                (0..s).map(move |p| {
                    (0..c).map(|i| seen(w[o * c + i], true) * seen(self.xs[i * s + p], self.x_rounded)).sum()
                })
            })
            .collect()
    }

    fn eval(&self, kernel: &mut dyn Kernel) -> Result<Vec<f32>, Error> {
        let mut y = zeros_for(kernel.outputs());
        kernel.eval(&[&self.x], &mut y.iter_mut().collect::<Vec<_>>())?;
        Ok(y[0].to_f32())
    }
}

/// Which of two references `got` matches, within `tol`.
fn which(got: &[f32], a: &[f64], b: &[f64], tol: f64) -> Option<char> {
    if max_rel_error(got, a) <= tol {
        Some('A')
    } else if max_rel_error(got, b) <= tol {
        Some('B')
    } else {
        None
    }
}

fn weight_reload(ctx: &Ctx<'_>) -> ProbeOutcome {
    const NAME: &str = "weight-reload";
    if let Some(r) = needs_compiles(NAME, ctx, 2) {
        return Ok(r);
    }
    let d = ctx.device;
    let case = ConvCase::new(d)?;
    let tol = tolerance(d, case.channels);
    let (mut weights, wa) = case.weights(0xA);
    let (wb_file, wb) = case.weights(0xB);
    let (ref_a, ref_b) = (case.reference(&wa), case.reference(&wb));
    let mut notes = Vec::new();

    // Compiled with A.
    let mut kernel = d.compile(&case.program, &weights)?;
    let ya = case.eval(kernel.as_mut())?;
    if which(&ya, &ref_a, &ref_b, tol) != Some('A') {
        return Ok(ProbeResult::new(
            NAME,
            ProbeStatus::Failed,
            "the kernel compiled with weights A does not compute A",
        ));
    }
    // The weight file changes after the compile.
    weights.insert_file("@model_path/weights/w.bin", wb_file.file("@model_path/weights/w.bin").unwrap().to_vec());
    let after_change = which(&case.eval(kernel.as_mut())?, &ref_a, &ref_b, tol);
    notes.push(format!("changing the weight file after compiling: the kernel computes {}", label(after_change)));

    // On the ANE: unload, rewrite the model directory's file, load (no compile).
    let mut reload = None;
    if let Some(ane) = ctx.ane {
        let mut k = ane.compile_kernel(&case.program, &case.weights(0xA).0)?;
        k.reload_weights(&weights)?;
        let got = which(&case.eval(&mut k)?, &ref_a, &ref_b, tol);
        notes.push(format!("unload → rewrite weights/w.bin → load: the kernel computes {}", label(got)));
        reload = Some(got);
    } else {
        // A fresh compile with B must compute B, or the comparison above proves nothing.
        let mut k = d.compile(&case.program, &weights)?;
        if which(&case.eval(k.as_mut())?, &ref_a, &ref_b, tol) != Some('B') {
            return Ok(ProbeResult::new(
                NAME,
                ProbeStatus::Failed,
                "a kernel compiled with weights B does not compute B",
            ));
        }
    }
    let baked = after_change == Some('A');
    let mut summary = if baked {
        "weights are baked in at compile time: changing the file afterwards changes nothing".to_string()
    } else {
        format!("changing the weight file after compiling changed the result ({})", label(after_change))
    };
    if let Some(r) = reload {
        summary.push_str(&format!("; an unload/rewrite/load reload computes {}", label(r)));
    }
    let coherent = after_change.is_some() && reload.is_none_or(|r| r.is_some());
    let mut result = ProbeResult::new(NAME, if coherent { ProbeStatus::Passed } else { ProbeStatus::Failed }, summary)
        .measure("baked_at_compile", baked as u8 as f64, "bool");
    if let Some(r) = reload {
        result = result.measure("reload_picks_up_new_weights", (r == Some('B')) as u8 as f64, "bool");
    }
    result.notes = notes;
    Ok(result)
}

fn label(w: Option<char>) -> &'static str {
    match w {
        Some('A') => "the old weights (A)",
        Some('B') => "the new weights (B)",
        _ => "neither the old nor the new weights",
    }
}

fn weights_buffer(ctx: &Ctx<'_>) -> ProbeOutcome {
    const NAME: &str = "weights-buffer";
    let Some(ane) = ctx.ane else {
        return not_applicable(NAME, ctx, "has no request weightsBuffer");
    };
    if let Some(r) = needs_compiles(NAME, ctx, 1) {
        return Ok(r);
    }
    let case = ConvCase::new(ane)?;
    let tol = tolerance(ane, case.channels);
    let (wa_file, wa) = case.weights(0xA);
    let (wb_file, wb) = case.weights(0xB);
    let mut k = ane.compile_kernel(&case.program, &wa_file)?;
    let mut y = zeros_for(k.outputs());
    let buffer = wb_file.file("@model_path/weights/w.bin").expect("one file");
    k.eval_with_weights_buffer(&[&case.x], &mut y.iter_mut().collect::<Vec<_>>(), buffer)?;
    let got = which(&y[0].to_f32(), &case.reference(&wa), &case.reference(&wb), tol);
    let status = if got.is_some() { ProbeStatus::Passed } else { ProbeStatus::Failed };
    Ok(ProbeResult::new(
        NAME,
        status,
        format!("with weights B in weightsBuffer, the kernel compiled with A computes {}", label(got)),
    )
    .measure("weights_buffer_replaces_weights", (got == Some('B')) as u8 as f64, "bool"))
}

// --- io-order ------------------------------------------------------------------------

/// Two inputs declared `zeta` `[1, C, 1, S]` then `alpha` `[1, C, 1, 2S]` (declaration
/// order is not alphabetical, sizes differ), and two outputs declared `zz` then `aa`:
/// `zz = zeta + 2·alpha[.., :S]`, `aa = alpha[.., S:] − zeta`.
pub fn io_order_program(dialect: Dialect) -> Result<Program, Error> {
    let (c, s) = (IO_ORDER_CHANNELS, IO_ORDER_SEQ);
    let mut g = Gen::new(dialect);
    let (_, zeta) = g.input("zeta", &[1, c, 1, s]);
    let (_, alpha) = g.input("alpha", &[1, c, 1, 2 * s]);
    let (c_, s_) = (c as i64, s as i64);
    let lo = g.b.slice_by_size("lo", &alpha, &[0, 0, 0, 0], &[1, c_, 1, s_]);
    let hi = g.b.slice_by_size("hi", &alpha, &[0, 0, 0, s_], &[1, c_, 1, s_]);
    let lo2 = g.b.scale("lo2", &lo, 2.0);
    let zz = g.b.add("zz16", &zeta, &lo2);
    let aa = g.b.sub("aa16", &hi, &zeta);
    g.output("zz", &zz);
    g.output("aa", &aa);
    g.finish()
}

const IO_ORDER_CHANNELS: usize = 256;
const IO_ORDER_SEQ: usize = 128;

fn io_order(ctx: &Ctx<'_>) -> ProbeOutcome {
    const NAME: &str = "io-order";
    let Some(ane) = ctx.ane else {
        return not_applicable(NAME, ctx, "binds surfaces by declaration, with no ordering rule to test");
    };
    if let Some(r) = needs_compiles(NAME, ctx, 2) {
        return Ok(r);
    }
    let program = io_order_program(ane.dialect())?;
    let (c, s) = (IO_ORDER_CHANNELS, IO_ORDER_SEQ);
    let mut rng = Rng(0x5eed_0003);
    let (z, a) = (rng.vec(c * s, 1.0), rng.vec(c * 2 * s, 1.0));
    let main = program.main().expect("built");
    let io = main.inputs[0].ty.dtype;
    let zeta = Surface::from_f32(io, &[1, c, 1, s], &z);
    let alpha = Surface::from_f32(io, &[1, c, 1, 2 * s], &a);
    let h = |v: f32| seen(v, true);
    let want_zz: Vec<f64> = (0..c * s).map(|i| h(z[i]) + 2.0 * h(a[(i / s) * 2 * s + i % s])).collect();
    let want_aa: Vec<f64> = (0..c * s).map(|i| h(a[(i / s) * 2 * s + s + i % s]) - h(z[i])).collect();
    let tol = tolerance(ane, 3);
    let mut notes = Vec::new();
    let mut correct = Vec::new();
    for (label, rules) in
        [("reported rules", BindingRules::default()), ("declaration order, exact sizes", BindingRules::none())]
    {
        let outcome = (|| -> Result<bool, Error> {
            let mut k = ane.with_binding(rules).compile_kernel(&program, &Weights::new())?;
            let mut outs = zeros_for(k.outputs());
            k.eval(&[&zeta, &alpha], &mut outs.iter_mut().collect::<Vec<_>>())?;
            Ok(max_rel_error(&outs[0].to_f32(), &want_zz) <= tol && max_rel_error(&outs[1].to_f32(), &want_aa) <= tol)
        })();
        let ok = matches!(outcome, Ok(true));
        notes.push(match outcome {
            Ok(true) => format!("{label}: correct"),
            Ok(false) => format!("{label}: wrong results"),
            Err(e) => format!("{label}: {}", first_line(&e.message)),
        });
        correct.push(ok);
    }
    let status = if correct[0] { ProbeStatus::Passed } else { ProbeStatus::Failed };
    let mut r = ProbeResult::new(
        NAME,
        status,
        format!(
            "two inputs and two outputs, declared out of alphabetical order with unequal sizes: reported rules {}, \
             declaration order {}",
            if correct[0] { "correct" } else { "WRONG" },
            if correct[1] { "correct" } else { "wrong" }
        ),
    )
    .measure("reported_rules_correct", correct[0] as u8 as f64, "bool")
    .measure("declaration_order_correct", correct[1] as u8 as f64, "bool");
    r.notes = notes;
    Ok(r)
}

// --- io-convention -------------------------------------------------------------------

/// Channels and positions of the io-convention programs: `a`, `b` are `[C, S]`, `W` is
/// `[C, C]`; every surface is at least 48 KiB in fp32 and has a width multiple of 32.
const IO_CONV_CHANNELS: usize = 128;
const IO_CONV_SEQ: usize = 96;

/// The ways of binding a kernel's data that the io-convention probe tries. Every
/// variant computes the same `y1 = Wᵀ·a` and `y2 = a + 2·b`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoVariant {
    /// One input `[1, C, 1, 2S + C]` = `a | b | W`, sliced inside; one output
    /// `[1, 2C, 1, S]` = `y1` over `y2` (concat on channels). Rank 4 throughout: the
    /// seed's working convention.
    Packed,
    /// Inputs `zb` `[1, C, 1, S]` then `aw` `[1, C, 1, S + C]`, outputs `zy` (`y2`) then
    /// `ay` (`y1`): declared out of alphabetical order, bound in declaration order.
    MultiDeclaration,
    /// The same program, bound in alphabetical order of the names.
    MultiAlphabetical,
    /// As `Packed`, but the matmul on rank-2 values.
    Rank2,
    /// As `Packed`, with a rank-5 reshape and transpose on the way.
    Rank5,
}

impl IoVariant {
    pub const ALL: [IoVariant; 5] = [
        IoVariant::Packed,
        IoVariant::MultiDeclaration,
        IoVariant::MultiAlphabetical,
        IoVariant::Rank2,
        IoVariant::Rank5,
    ];

    /// The measurement name in probe reports (`<name>_correct`).
    pub fn name(self) -> &'static str {
        match self {
            IoVariant::Packed => "packed",
            IoVariant::MultiDeclaration => "multi_declaration_order",
            IoVariant::MultiAlphabetical => "multi_alphabetical_order",
            IoVariant::Rank2 => "rank2",
            IoVariant::Rank5 => "rank5",
        }
    }
}

/// The program of an io-convention variant (both multi variants share one).
pub fn io_convention_program(dialect: Dialect, variant: IoVariant) -> Result<Program, Error> {
    let (c, s) = (IO_CONV_CHANNELS as i64, IO_CONV_SEQ as i64);
    let mut g = Gen::new(dialect);
    let slice4 = |g: &mut Gen, name: &str, x: &Var, s0: i64, width: i64| {
        let v = g.b.slice_by_size(&format!("{name}_s"), x, &[0, 0, 0, s0], &[1, c, 1, width]);
        g.b.reshape(name, &v, &[1, 1, c, width])
    };
    let (a, b, w) = match variant {
        IoVariant::MultiDeclaration | IoVariant::MultiAlphabetical => {
            let (_, zb) = g.input("zb", &[1, c as usize, 1, s as usize]);
            let (_, aw) = g.input("aw", &[1, c as usize, 1, (s + c) as usize]);
            let b = g.b.reshape("b", &zb, &[1, 1, c, s]);
            (slice4(&mut g, "a", &aw, 0, s), b, slice4(&mut g, "w", &aw, s, c))
        }
        _ => {
            let (_, x) = g.input("x", &[1, c as usize, 1, (2 * s + c) as usize]);
            (slice4(&mut g, "a", &x, 0, s), slice4(&mut g, "b", &x, s, s), slice4(&mut g, "w", &x, 2 * s, c))
        }
    };
    let y1 = match variant {
        IoVariant::Rank2 => {
            let w2 = g.b.reshape("w2", &w, &[c, c]);
            let a2 = g.b.reshape("a2", &a, &[c, s]);
            let y = g.b.matmul("y1_2", &w2, &a2, true, false);
            g.b.reshape("y1", &y, &[1, 1, c, s])
        }
        IoVariant::Rank5 => {
            let a5 = g.b.reshape("a5", &a, &[1, 2, c / 2, s / 2, 2]);
            let t5 = g.b.transpose("a5t", &a5, &[0, 1, 2, 4, 3]);
            let back = g.b.transpose("a5b", &t5, &[0, 1, 2, 4, 3]);
            let a4 = g.b.reshape("a4", &back, &[1, 1, c, s]);
            g.b.matmul("y1", &w, &a4, true, false)
        }
        _ => g.b.matmul("y1", &w, &a, true, false),
    };
    let b2 = g.b.scale("b2", &b, 2.0);
    let y2 = g.b.add("y2", &a, &b2);
    let y1s = g.b.reshape("y1s", &y1, &[1, c, 1, s]);
    let y2s = g.b.reshape("y2s", &y2, &[1, c, 1, s]);
    match variant {
        IoVariant::MultiDeclaration | IoVariant::MultiAlphabetical => {
            g.output("zy", &y2s);
            g.output("ay", &y1s);
        }
        _ => {
            let both = g.b.concat("y", &[&y1s, &y2s], 1);
            g.output("out", &both);
        }
    }
    g.finish()
}

/// Runs one io-convention variant on `device`: `Ok(true)` if it compiled and gave the
/// right numbers, `Ok(false)` if the numbers were wrong, `Err` if it failed.
fn io_convention_case(device: &dyn Device, variant: IoVariant) -> Result<bool, Error> {
    let (c, s) = (IO_CONV_CHANNELS, IO_CONV_SEQ);
    let program = io_convention_program(device.dialect(), variant)?;
    let main = program.main().expect("built");
    let io = main.inputs[0].ty.dtype;
    let mut rng = Rng(0x5eed_0017);
    let (a, b, w) = (rng.vec(c * s, 1.0), rng.vec(c * s, 1.0), rng.vec(c * c, 0.1));
    let fp16 = rounds_inputs(device, io);
    let h = |v: f32| seen(v, fp16);
    let mut y1 = vec![0.0f64; c * s];
    for o in 0..c {
        for i in 0..c {
            let wio = h(w[i * c + o]);
            for t in 0..s {
                y1[o * s + t] += wio * h(a[i * s + t]);
            }
        }
    }
    let y2: Vec<f64> = (0..c * s).map(|i| h(a[i]) + 2.0 * h(b[i])).collect();
    let mut k = device.compile(&program, &Weights::new())?;
    let rows = |parts: &[&[f32]], width: usize| -> Vec<f32> {
        // Blocks side by side on the spatial axis, row by row.
        let mut out = Vec::with_capacity(c * width);
        for r in 0..c {
            for p in parts {
                let pw = p.len() / c;
                out.extend_from_slice(&p[r * pw..(r + 1) * pw]);
            }
        }
        out
    };
    let mut outs = zeros_for(k.outputs());
    let (got1, got2) = match variant {
        IoVariant::MultiDeclaration | IoVariant::MultiAlphabetical => {
            let zb = Surface::from_f32(io, &[1, c, 1, s], &b);
            let aw = Surface::from_f32(io, &[1, c, 1, s + c], &rows(&[&a, &w], s + c));
            k.eval(&[&zb, &aw], &mut outs.iter_mut().collect::<Vec<_>>())?;
            (outs[1].to_f32(), outs[0].to_f32())
        }
        _ => {
            let x = Surface::from_f32(io, &[1, c, 1, 2 * s + c], &rows(&[&a, &b, &w], 2 * s + c));
            k.eval(&[&x], &mut outs.iter_mut().collect::<Vec<_>>())?;
            let all = outs[0].to_f32();
            (all[..c * s].to_vec(), all[c * s..].to_vec())
        }
    };
    let tol = tolerance(device, c);
    Ok(max_rel_error(&got1, &y1) <= tol && max_rel_error(&got2, &y2) <= tol)
}

fn io_convention(ctx: &Ctx<'_>) -> ProbeOutcome {
    const NAME: &str = "io-convention";
    if let Some(r) = needs_compiles(NAME, ctx, IoVariant::ALL.len()) {
        return Ok(r);
    }
    let mut r = ProbeResult::new(NAME, ProbeStatus::Passed, "");
    let mut lines = Vec::new();
    for variant in IoVariant::ALL {
        let outcome = match (variant, ctx.ane) {
            (IoVariant::MultiDeclaration, Some(ane)) => {
                io_convention_case(&ane.with_binding(BindingRules::none()), variant)
            }
            (IoVariant::MultiAlphabetical, Some(ane)) => io_convention_case(
                &ane.with_binding(BindingRules { alphabetical_order: true, ..BindingRules::none() }),
                variant,
            ),
            // Other devices bind in declaration order: there is no alphabetical order
            // to try.
            (IoVariant::MultiAlphabetical, None) => {
                lines.push(format!("{}: not applicable on the {} device", variant.name(), ctx.device.name()));
                continue;
            }
            _ => io_convention_case(ctx.device, variant),
        };
        let ok = matches!(outcome, Ok(true));
        r = r.measure(&format!("{}_correct", variant.name()), ok as u8 as f64, "bool");
        lines.push(match outcome {
            Ok(true) => format!("{}: compiles, correct", variant.name()),
            Ok(false) => format!("{}: compiles, WRONG numbers", variant.name()),
            Err(e) => format!("{}: {}", variant.name(), first_line(&e.message)),
        });
    }
    let packed_ok = r.measurement("packed_correct") == Some(1.0);
    r.status = if packed_ok { ProbeStatus::Passed } else { ProbeStatus::Failed };
    let works: Vec<&str> = IoVariant::ALL
        .iter()
        .filter(|v| r.measurement(&format!("{}_correct", v.name())) == Some(1.0))
        .map(|v| v.name())
        .collect();
    r.summary = format!("correct: {}", if works.is_empty() { "none".to_string() } else { works.join(", ") });
    r.notes = lines;
    Ok(r)
}

/// How `train --device ane` binds kernels, as chosen from an io-convention probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoChoice {
    /// One packed input and output surface.
    Packed,
    /// One surface per input and output, bound in declaration order (`true`) or in
    /// alphabetical order of the names (`false`).
    Multi { declaration_order: bool },
}

/// The file `anetrain probe io-convention --device ane` writes and `train --device ane`
/// reads (in the working directory unless `--ane-io-probe` names another).
pub const IO_CONVENTION_FILE: &str = "anetrain-io-convention.json";

/// Chooses the I/O convention from a probe report (JSON as [`ProbeReport::to_json`]
/// writes it). `want_multi`: the user asked for several surfaces (`--ane-io multi`).
/// Errors say why, naming the probe to run.
pub fn choose_io_convention(report_json: &str, want_multi: bool) -> Result<IoChoice, String> {
    let report: ProbeReport = serde_json::from_str(report_json).map_err(|e| format!("not a probe report: {e}"))?;
    let Some(r) = report.results.iter().find(|r| r.name == "io-convention") else {
        return Err("the report has no `io-convention` result: run `anetrain probe io-convention --device ane`".into());
    };
    if report.device != "ane" {
        return Err(format!(
            "the report is from the {} device, not the ANE: run `anetrain probe io-convention --device ane` on the Mac",
            report.device
        ));
    }
    let ok = |v: IoVariant| r.measurement(&format!("{}_correct", v.name())) == Some(1.0);
    let multi = if ok(IoVariant::MultiDeclaration) {
        Some(IoChoice::Multi { declaration_order: true })
    } else if ok(IoVariant::MultiAlphabetical) {
        Some(IoChoice::Multi { declaration_order: false })
    } else {
        None
    };
    match (want_multi, ok(IoVariant::Packed), multi) {
        (true, _, Some(m)) | (false, false, Some(m)) => Ok(m),
        (true, _, None) => Err("the io-convention probe found no binding order that gives correct numbers with \
                                several surfaces on this chip: use the packed convention (`--ane-io packed`)"
            .into()),
        (false, true, _) => Ok(IoChoice::Packed),
        (false, false, None) => Err("the io-convention probe found no convention that gives correct numbers on \
                                     this chip (see its notes in the report)"
            .into()),
    }
}

// --- qos-sweep and perf-stats --------------------------------------------------------

/// Apple's QoS classes (`qos_class_t`): background, utility, default, user-initiated,
/// user-interactive.
pub const QOS_CLASSES: [u32; 5] = [9, 17, 21, 25, 33];

fn qos_sweep(ctx: &Ctx<'_>) -> ProbeOutcome {
    const NAME: &str = "qos-sweep";
    let Some(ane) = ctx.ane else {
        return not_applicable(NAME, ctx, "has no QoS classes");
    };
    if let Some(r) = needs_compiles(NAME, ctx, QOS_CLASSES.len()) {
        return Ok(r);
    }
    let case = ConvCase::new(ane)?;
    let (w, _) = case.weights(0xA);
    let mut r = ProbeResult::new(NAME, ProbeStatus::Passed, "");
    let mut parts = Vec::new();
    for qos in QOS_CLASSES {
        let d = ane.with_qos(qos);
        let t = Instant::now();
        let mut k = d.compile_kernel(&case.program, &w)?;
        let compile_ms = t.elapsed().as_secs_f64() * 1e3;
        let mut y = zeros_for(k.outputs());
        let eval_ms =
            mean_eval_seconds(&mut k, &[&case.x], &mut y.iter_mut().collect::<Vec<_>>(), ctx.options.iterations)? * 1e3;
        r = r.measure(&format!("compile_and_load_ms_qos{qos}"), compile_ms, "ms").measure(
            &format!("eval_ms_qos{qos}"),
            eval_ms,
            "ms",
        );
        parts.push(format!("{qos}: {eval_ms:.3} ms"));
    }
    r.summary = format!("mean eval latency by QoS — {}", parts.join(", "));
    Ok(r)
}

fn perf_stats(ctx: &Ctx<'_>) -> ProbeOutcome {
    const NAME: &str = "perf-stats";
    if ctx.ane.is_none() && ctx.device.name() == "cpu" {
        return not_applicable(NAME, ctx, "has no hardware timer apart from wall time");
    }
    if let Some(r) = needs_compiles(NAME, ctx, 1) {
        return Ok(r);
    }
    let case = ConvCase::new(ctx.device)?;
    let (w, _) = case.weights(0xA);
    let mut k: Box<dyn Kernel> = match ctx.ane {
        // A mask of the four counter bits reported accepted (0xF).
        Some(ane) => Box::new(ane.with_perf_stats_mask(Some(0xF)).compile_kernel(&case.program, &w)?),
        None => ctx.device.compile(&case.program, &w)?,
    };
    case.eval(k.as_mut())?;
    Ok(match k.last_hw_time_ns() {
        Some(ns) => {
            ProbeResult::new(NAME, ProbeStatus::Passed, format!("the device reports {ns} ns of execution time"))
                .measure("hw_execution_time_ns", ns as f64, "ns")
        }
        None => ProbeResult::new(NAME, ProbeStatus::Failed, "the device reported no execution time for an eval"),
    })
}

// --- compile-limit -------------------------------------------------------------------

/// The marker before the child's JSON line on stdout.
pub const CHILD_MARKER: &str = "anetrain-probe-child:";

/// What the compile-limit child found.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChildReport {
    /// Programs compiled, evaluated and checked before the first failure.
    pub compiles_ok: usize,
    /// The failure: `compile-budget`, `compile`, `eval`, `wrong-result`, or none.
    pub failure_kind: Option<String>,
    pub failure: Option<String>,
    /// The cap the child was given.
    pub max_compiles: usize,
}

impl ChildReport {
    /// The line the child prints on stdout for the parent to find.
    pub fn line(&self) -> String {
        format!("{CHILD_MARKER} {}", serde_json::to_string(self).expect("plain data serialises"))
    }

    /// Finds the child's report in its stdout: the JSON after the marker, which need not
    /// start its line (a test harness may print before it).
    pub fn parse(stdout: &str) -> Option<ChildReport> {
        stdout
            .lines()
            .find_map(|l| l.find(CHILD_MARKER).map(|at| &l[at + CHILD_MARKER.len()..]))
            .and_then(|json| serde_json::from_str(json.trim()).ok())
    }
}

/// The compile-limit probe's child: compiles distinct programs (`y = k·x` for k = 1, 2,
/// …) on `device` until one fails or `max_compiles` succeed, evaluating and checking
/// each (a compile that "succeeds" but computes wrongly is a failure too). The binary
/// running this prints `report.line()` on stdout; the parent reads it.
pub fn compile_limit_child(device: &dyn Device, max_compiles: usize) -> ChildReport {
    let mut report = ChildReport { compiles_ok: 0, failure_kind: None, failure: None, max_compiles };
    let (c, s) = (128, 192); // 48 KiB in fp16
    for k in 1..=max_compiles {
        let attempt = (|| -> Result<(), (&'static str, String)> {
            let as_err = |e: Error| {
                let kind = match e.kind {
                    ErrorKind::CompileBudget => "compile-budget",
                    ErrorKind::Eval | ErrorKind::Binding => "eval",
                    _ => "compile",
                };
                (kind, e.message)
            };
            let mut g = Gen::new(device.dialect());
            let (_, x) = g.input("x", &[1, c, 1, s]);
            let y = g.b.scale("scaled", &x, k as f64);
            g.output("y", &y);
            let program = g.finish().map_err(as_err)?;
            let mut kernel = device.compile(&program, &Weights::new()).map_err(as_err)?;
            let xs: Vec<f32> = (0..c * s).map(|i| (i % 7) as f32 - 3.0).collect();
            let io = kernel.inputs()[0].ty.dtype;
            let input = Surface::from_f32(io, &[1, c, 1, s], &xs);
            let mut out = zeros_for(kernel.outputs());
            kernel.eval(&[&input], &mut out.iter_mut().collect::<Vec<_>>()).map_err(as_err)?;
            let want: Vec<f64> = xs.iter().map(|v| seen(*v * k as f32, true)).collect();
            if max_rel_error(&out[0].to_f32(), &want) > 1e-3 {
                return Err(("wrong-result", format!("program {k} compiled but computed wrong values")));
            }
            Ok(())
        })();
        match attempt {
            Ok(()) => report.compiles_ok += 1,
            Err((kind, message)) => {
                report.failure_kind = Some(kind.to_string());
                report.failure = Some(first_line(&message).to_string());
                break;
            }
        }
    }
    report
}

fn compile_limit(ctx: &Ctx<'_>) -> ProbeOutcome {
    const NAME: &str = "compile-limit";
    let Some(child) = &ctx.options.compile_limit_child else {
        return Ok(ProbeResult::new(
            NAME,
            ProbeStatus::Unavailable,
            "no child command: this probe spends a whole process's compile budget, so it runs in a child process \
             (the CLI provides one)",
        ));
    };
    let output =
        Command::new(&child.program).args(&child.args).envs(child.env.iter().map(|(k, v)| (k, v))).output().map_err(
            |e| Error::new(ErrorKind::Eval, format!("cannot start the child `{}`: {e}", child.program.display())),
        )?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let Some(report) = ChildReport::parse(&stdout) else {
        let mut r = ProbeResult::new(
            NAME,
            ProbeStatus::Failed,
            format!("the child ({}) printed no `{CHILD_MARKER}` line", output.status),
        );
        r.notes = String::from_utf8_lossy(&output.stderr).lines().rev().take(10).map(str::to_string).collect();
        r.notes.reverse();
        return Ok(r);
    };
    let summary = match (&report.failure_kind, &report.failure) {
        (Some(kind), Some(why)) => format!("{} programs compiled and ran; then {kind}: {why}", report.compiles_ok),
        _ => format!("all {} programs compiled and ran (no limit met below the cap)", report.compiles_ok),
    };
    let status = match report.failure_kind.as_deref() {
        // Hitting the limit is what the probe looks for; a silently wrong result is a failure.
        None | Some("compile-budget") | Some("compile") => ProbeStatus::Passed,
        _ => ProbeStatus::Failed,
    };
    Ok(ProbeResult::new(NAME, status, summary).measure(
        "compiles_before_failure",
        report.compiles_ok as f64,
        "compiles",
    ))
}

// --- compile-eval-overlap ------------------------------------------------------------

fn compile_eval_overlap(ctx: &Ctx<'_>) -> ProbeOutcome {
    const NAME: &str = "compile-eval-overlap";
    if let Some(r) = needs_compiles(NAME, ctx, 2) {
        return Ok(r);
    }
    let d = ctx.device;
    let case = ConvCase::new(d)?;
    let (wa, va) = case.weights(0xA);
    let (wb, vb) = case.weights(0xB);
    let ref_a = case.reference(&va);
    let tol = tolerance(d, case.channels);
    let mut kernel = d.compile(&case.program, &wa)?;
    // Evaluate kernel A on this thread while another compiles kernel B; count the evals
    // that finish while the compile is running, and check every one of them.
    const MAX_EVALS: usize = 100_000;
    let compiling = AtomicBool::new(true);
    let (compiled, overlapped, wrong, eval_error) = std::thread::scope(|s| {
        let compile = s.spawn(|| {
            let k = d.compile(&case.program, &wb);
            compiling.store(false, Ordering::SeqCst);
            k
        });
        let (mut overlapped, mut wrong, mut eval_error) = (0usize, 0usize, None);
        while compiling.load(Ordering::SeqCst) && overlapped < MAX_EVALS {
            match case.eval(kernel.as_mut()) {
                Ok(y) => {
                    // Only evals that ended before the compile did count as overlapped.
                    if compiling.load(Ordering::SeqCst) {
                        overlapped += 1;
                    }
                    wrong += (max_rel_error(&y, &ref_a) > tol) as usize;
                }
                Err(e) => {
                    eval_error = Some(e);
                    break;
                }
            }
        }
        (compile.join().expect("the compile thread does not panic"), overlapped, wrong, eval_error)
    });
    if let Some(e) = eval_error {
        return Err(e);
    }
    let mut kb = compiled?;
    let b_ok = max_rel_error(&case.eval(kb.as_mut())?, &case.reference(&vb)) <= tol;
    let status = if wrong == 0 && b_ok { ProbeStatus::Passed } else { ProbeStatus::Failed };
    Ok(ProbeResult::new(
        NAME,
        status,
        format!(
            "{overlapped} evals of one kernel completed during another's compile ({wrong} wrong); the new kernel {}",
            if b_ok { "is right" } else { "is WRONG" }
        ),
    )
    .measure("overlapped_evals", overlapped as f64, "evals"))
}

// --- dispatch-overhead and peak ------------------------------------------------------

/// `(channels, seq)` of the dispatch-overhead kernels: 32 Ki to 1 Mi elements (all at
/// least 48 KiB in fp16).
pub const DISPATCH_SIZES: [(usize, usize); 4] = [(128, 256), (256, 256), (512, 512), (1024, 1024)];

fn dispatch_overhead(ctx: &Ctx<'_>) -> ProbeOutcome {
    const NAME: &str = "dispatch-overhead";
    if let Some(r) = needs_compiles(NAME, ctx, DISPATCH_SIZES.len()) {
        return Ok(r);
    }
    let d = ctx.device;
    let mut points = Vec::new();
    let mut r = ProbeResult::new(NAME, ProbeStatus::Passed, "");
    for (c, s) in DISPATCH_SIZES {
        let mut g = Gen::new(d.dialect());
        let (_, x) = g.input("x", &[1, c, 1, s]);
        let y = g.b.scale("scaled", &x, 2.0);
        g.output("y", &y);
        let mut k = d.compile(&g.finish()?, &Weights::new())?;
        let input = Surface::zeros(k.inputs()[0].ty.dtype, &[1, c, 1, s]);
        let mut out = zeros_for(k.outputs());
        let t =
            mean_eval_seconds(k.as_mut(), &[&input], &mut out.iter_mut().collect::<Vec<_>>(), ctx.options.iterations)?;
        points.push(((c * s) as f64, t));
        r.notes.push(format!("[1, {c}, 1, {s}]: {:.1} µs per eval", t * 1e6));
        r = r.measure(&format!("eval_us_{c}x{s}"), t * 1e6, "µs");
    }
    let (intercept, slope) = least_squares(&points);
    r.summary = format!(
        "fixed cost per dispatch ≈ {:.1} µs (fit over {} sizes), then {:.3} ns per element",
        intercept * 1e6,
        points.len(),
        slope * 1e9
    );
    Ok(r.measure("dispatch_overhead_us", intercept * 1e6, "µs").measure("ns_per_element", slope * 1e9, "ns"))
}

/// The line `y = a + b·x` through `points` by least squares: `(a, b)`.
pub fn least_squares(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let (sx, sy) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let sxx: f64 = points.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    let sxy: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    (my - slope * mx, slope)
}

/// A chain of `layers` 1×1 convolutions `C → C` on `[1, C, 1, S]`, each with its own
/// BLOBFILE weight (at most 16 per program are reported to compile).
pub fn conv_stack_program(
    dialect: Dialect,
    channels: usize,
    seq: usize,
    layers: usize,
) -> Result<(Program, Weights, Vec<Vec<f32>>), Error> {
    let mut g = Gen::new(dialect);
    let (_, mut h) = g.input("x", &[1, channels, 1, seq]);
    let mut weights = Weights::new();
    let mut rng = Rng(0x5eed_0004);
    let mut all = Vec::new();
    for l in 0..layers {
        let values = rng.vec(channels * channels, 1.0 / (channels as f32).sqrt());
        let w =
            g.b.constant(&format!("w{l}"), weights.add_tensor(&format!("w{l}"), &[channels, channels, 1, 1], &values));
        h = g.b.conv1x1(&format!("h{l}"), &h, &w);
        all.push(values);
    }
    g.output("y", &h);
    Ok((g.finish()?, weights, all))
}

fn peak(ctx: &Ctx<'_>) -> ProbeOutcome {
    const NAME: &str = "peak";
    if let Some(r) = needs_compiles(NAME, ctx, 1) {
        return Ok(r);
    }
    let d = ctx.device;
    // The ANE gets work big enough to fill it; the CPU something that runs in a moment.
    let (c, s, layers) = if ctx.ane.is_some() { (512, 1024, 12) } else { (256, 256, 8) };
    let (program, weights, ws) = conv_stack_program(d.dialect(), c, s, layers)?;
    let mut k = d.compile(&program, &weights)?;
    let xs = Rng(0x5eed_0005).vec(c * s, 1.0);
    let x = Surface::from_f32(k.inputs()[0].ty.dtype, &[1, c, 1, s], &xs);
    let mut out = zeros_for(k.outputs());
    let t = mean_eval_seconds(k.as_mut(), &[&x], &mut out.iter_mut().collect::<Vec<_>>(), ctx.options.iterations)?;
    let flops = 2.0 * (c * c * s * layers) as f64;
    let tflops = flops / t / 1e12;

    // Check a few positions against a naive chain (positions are independent).
    let y = out[0].to_f32();
    let fp16 = d.precision() == Precision::Fp16;
    let x_rounded = rounds_inputs(d, x.dtype());
    let mut worst: f64 = 0.0;
    for p in [0, s / 3, s - 1] {
        let mut h: Vec<f64> = (0..c).map(|i| seen(xs[i * s + p], x_rounded)).collect();
        for w in &ws {
            h = (0..c)
                .map(|o| (0..c).map(|i| seen(w[o * c + i], true) * h[i]).sum::<f64>())
                .map(|v| seen(v as f32, fp16))
                .collect();
        }
        for o in 0..c {
            worst = worst.max((y[o * s + p] as f64 - h[o]).abs() / (1.0 + h[o].abs()));
        }
    }
    let tol = tolerance(d, c) * layers as f64;
    let status = if worst <= tol { ProbeStatus::Passed } else { ProbeStatus::Failed };
    Ok(ProbeResult::new(
        NAME,
        status,
        format!(
            "{tflops:.3} TFLOPS on {layers} stacked 1×1 convs (C {c}, S {s}), {:.2} ms per eval; spot check {}",
            t * 1e3,
            if status == ProbeStatus::Passed { "matches" } else { "DIFFERS" }
        ),
    )
    .measure("tflops", tflops, "TFLOPS")
    .measure("eval_ms", t * 1e3, "ms")
    .measure("max_relative_error", worst, ""))
}

// --- Reports -------------------------------------------------------------------------

/// A probe run with what it ran on: what `anetrain probe` prints and writes as JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeReport {
    pub anetrain_version: String,
    pub os: String,
    pub arch: String,
    /// The CPU or chip, as `device::info` describes it.
    pub machine: String,
    pub device: String,
    pub dialect: String,
    pub precision: String,
    pub results: Vec<ProbeResult>,
}

impl ProbeReport {
    pub fn new(device: &dyn Device, results: Vec<ProbeResult>) -> ProbeReport {
        ProbeReport {
            anetrain_version: env!("CARGO_PKG_VERSION").to_string(),
            os: std::env::consts::OS.to_string(),
            arch: std::env::consts::ARCH.to_string(),
            machine: crate::info::cpu_model(),
            device: device.name().to_string(),
            dialect: device.dialect().to_string(),
            precision: device.precision().name().to_string(),
            results,
        }
    }

    /// Pretty JSON, to share.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("plain data serialises")
    }

    /// The human table: one row per probe, its measurements and notes indented below.
    pub fn table(&self) -> String {
        let mut out = format!(
            "probes on {} ({}, {}) — {} {}\n",
            self.device, self.dialect, self.precision, self.machine, self.os
        );
        out.push_str(&format!("{:<22} {:<15} {}\n", "PROBE", "STATUS", "RESULT"));
        for r in &self.results {
            out.push_str(&format!("{:<22} {:<15} {}\n", r.name, r.status.name(), r.summary));
            for m in &r.measurements {
                out.push_str(format!("{:<38} {} = {} {}", "", m.name, format_number(m.value), m.unit).trim_end());
                out.push('\n');
            }
            for n in &r.notes {
                out.push_str(&format!("{:<38} {n}\n", ""));
            }
        }
        let count = |s: ProbeStatus| self.results.iter().filter(|r| r.status == s).count();
        out.push_str(&format!(
            "{} passed, {} failed, {} not applicable, {} unavailable\n",
            count(ProbeStatus::Passed),
            count(ProbeStatus::Failed),
            count(ProbeStatus::NotApplicable),
            count(ProbeStatus::Unavailable)
        ));
        out
    }

    /// The process exit status for this run: 1 if any probe failed, else 0. (A device
    /// that cannot be opened at all is the CLI's exit status 2, before any probe runs.)
    pub fn exit_code(&self) -> i32 {
        if self.results.iter().any(|r| r.status == ProbeStatus::Failed) {
            1
        } else {
            0
        }
    }
}

fn format_number(v: f64) -> String {
    if v != 0.0 && (v.abs() < 1e-3 || v.abs() >= 1e6) {
        format!("{v:.3e}")
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.4}")
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}
