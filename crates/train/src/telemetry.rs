//! JSON-lines telemetry and the Efficiency Report. The schema is documented in
//! docs/TELEMETRY.md; every line is one JSON object with an `"event"` field.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::pipeline::PhaseTimes;

/// FLOPs of one training step, split by where they run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepFlops {
    /// Kernels on the device: projections, attention, FFN, forward and input gradients.
    pub device: f64,
    /// The CPU: classifier forward and backward, weight gradients.
    pub cpu: f64,
}

impl StepFlops {
    /// Counts multiply-adds as 2 FLOPs, attention over the full `S×S` square (the
    /// kernels compute masked scores too). Elementwise work is not counted.
    pub fn for_step(config: &llama::Config, batch: usize, seq: usize) -> StepFlops {
        let (d, h, kv, v) =
            (config.dim as f64, config.hidden_dim as f64, config.kv_dim() as f64, config.vocab_size as f64);
        let (l, b, s) = (config.n_layers as f64, batch as f64, seq as f64);
        let t = b * s;
        let layer_matmul_params = d * d * 2.0 + 2.0 * d * kv + 3.0 * d * h;
        // Per layer: scores and P·V (4·S²·D per sequence) forward; backward recomputes
        // the scores and does dV, dP, dQ, dK (10·S²·D).
        let attention_fwd = 4.0 * s * s * d * b;
        let attention_bwd = 10.0 * s * s * d * b;
        let device =
            l * (2.0 * layer_matmul_params * t + attention_fwd + 2.0 * layer_matmul_params * t + attention_bwd);
        let dw = l * 2.0 * layer_matmul_params * t;
        let classifier = 2.0 * v * d * t * 3.0;
        StepFlops { device, cpu: dw + classifier }
    }

    pub fn total(&self) -> f64 {
        self.device + self.cpu
    }
}

/// Totals that survive stops, resumes and exec() restarts (they live in checkpoints).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Cumulative {
    pub steps: u64,
    pub tokens: u64,
    pub wall_seconds: f64,
    pub compile_seconds: f64,
    /// Time inside training steps (forward, backward, optimizer).
    pub train_seconds: f64,
    /// Time in device kernel evaluations.
    pub device_seconds: f64,
    pub device_flops: f64,
    pub total_flops: f64,
    pub restarts: u64,
    /// Time the trainer waited for a background compile (double-buffered pipeline).
    pub compile_stall_seconds: f64,
    pub compiles: u64,
}

/// One line of telemetry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Start {
        config: llama::Config,
        n_params: usize,
        tokens_per_step: usize,
        flops_per_step: f64,
        device: String,
        precision: String,
        pipeline: String,
        /// The full training settings, as the CLI resolved them.
        settings: serde_json::Value,
        resumed_from_step: Option<u64>,
    },
    Step {
        step: u64,
        loss: f32,
        lr: f32,
        grad_norm: f32,
        tokens_per_s: f64,
        gflops: f64,
        ms: f64,
        phases_ms: PhasesMs,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        loss_scale: Option<f32>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        compile_stall_ms: Option<f64>,
        /// Targets the loss of this step averaged over: batch × seq × accum, or fewer
        /// with a loss mask (chat data: the assistant's tokens only). Absent in lines
        /// written before masks existed.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        loss_tokens: Option<u64>,
    },
    Eval {
        step: u64,
        val_loss: f32,
    },
    Checkpoint {
        step: u64,
        path: String,
    },
    Restart {
        step: u64,
        compiles_done: usize,
    },
    End {
        report: Report,
    },
}

/// Milliseconds per phase of one step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PhasesMs {
    pub device_forward: f64,
    pub device_backward: f64,
    pub surface_io: f64,
    pub rmsnorm: f64,
    pub classifier_loss: f64,
    pub dw: f64,
    pub optimizer: f64,
    pub other: f64,
}

impl PhasesMs {
    /// The phases with their telemetry names, in step order.
    pub fn named(&self) -> [(&'static str, f64); 8] {
        [
            ("device_forward", self.device_forward),
            ("device_backward", self.device_backward),
            ("surface_io", self.surface_io),
            ("rmsnorm", self.rmsnorm),
            ("classifier_loss", self.classifier_loss),
            ("dw", self.dw),
            ("optimizer", self.optimizer),
            ("other", self.other),
        ]
    }

    /// Phase-by-phase sum, for averaging over steps.
    pub fn add(&mut self, o: &PhasesMs) {
        self.device_forward += o.device_forward;
        self.device_backward += o.device_backward;
        self.surface_io += o.surface_io;
        self.rmsnorm += o.rmsnorm;
        self.classifier_loss += o.classifier_loss;
        self.dw += o.dw;
        self.optimizer += o.optimizer;
        self.other += o.other;
    }

    pub fn from_times(t: &PhaseTimes, optimizer_ms: f64) -> PhasesMs {
        PhasesMs {
            device_forward: t.device_forward,
            device_backward: t.device_backward,
            surface_io: t.surface_io,
            rmsnorm: t.rmsnorm,
            classifier_loss: t.classifier,
            dw: t.dw,
            optimizer: optimizer_ms,
            other: t.other_cpu,
        }
    }
}

/// Writes telemetry lines to a file or stdout (`-`), or nowhere.
pub struct Telemetry {
    out: Option<Box<dyn Write + Send>>,
}

impl Telemetry {
    pub fn none() -> Telemetry {
        Telemetry { out: None }
    }

    /// `-` is stdout; a file is appended to, so a resumed run continues its telemetry.
    pub fn open(target: &Path) -> std::io::Result<Telemetry> {
        if target.as_os_str() == "-" {
            return Ok(Telemetry { out: Some(Box::new(std::io::stdout())) });
        }
        let f = File::options().create(true).append(true).open(target)?;
        Ok(Telemetry { out: Some(Box::new(BufWriter::new(f))) })
    }

    /// Writes one event and flushes, so a dashboard following the file sees it now.
    pub fn emit(&mut self, event: &Event) -> std::io::Result<()> {
        if let Some(out) = &mut self.out {
            let line = serde_json::to_string(event).expect("telemetry events serialise");
            writeln!(out, "{line}")?;
            out.flush()?;
        }
        Ok(())
    }
}

/// The Efficiency Report: where the time went and what it achieved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub steps: u64,
    pub restarts: u64,
    pub wall_seconds: f64,
    pub compile_seconds: f64,
    pub compile_share: f64,
    pub train_seconds: f64,
    pub train_share: f64,
    pub ms_per_step: f64,
    pub tokens_per_s: f64,
    pub device_gflops: f64,
    pub total_gflops: f64,
    pub compile_stall_seconds: f64,
    pub compiles: u64,
}

impl Report {
    pub fn from_cumulative(c: &Cumulative) -> Report {
        let share = |x: f64| if c.wall_seconds > 0.0 { x / c.wall_seconds } else { 0.0 };
        let per = |x: f64, by: f64| if by > 0.0 { x / by } else { 0.0 };
        Report {
            steps: c.steps,
            restarts: c.restarts,
            wall_seconds: c.wall_seconds,
            compile_seconds: c.compile_seconds,
            compile_share: share(c.compile_seconds),
            train_seconds: c.train_seconds,
            train_share: share(c.train_seconds),
            ms_per_step: per(c.train_seconds * 1e3, c.steps as f64),
            tokens_per_s: per(c.tokens as f64, c.train_seconds),
            device_gflops: per(c.device_flops / 1e9, c.device_seconds),
            total_gflops: per(c.total_flops / 1e9, c.train_seconds),
            compile_stall_seconds: c.compile_stall_seconds,
            compiles: c.compiles,
        }
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "── Efficiency Report ──────────────────────────────")?;
        writeln!(f, "  steps               {:>12}", self.steps)?;
        writeln!(f, "  restarts            {:>12}", self.restarts)?;
        writeln!(f, "  wall time           {:>10.2} s", self.wall_seconds)?;
        writeln!(
            f,
            "  compile time        {:>10.2} s  ({:.1} %, {} compiles)",
            self.compile_seconds,
            100.0 * self.compile_share,
            self.compiles
        )?;
        if self.compile_stall_seconds > 0.0 {
            writeln!(f, "  compile stall       {:>10.2} s", self.compile_stall_seconds)?;
        }
        writeln!(f, "  train time          {:>10.2} s  ({:.1} %)", self.train_seconds, 100.0 * self.train_share)?;
        writeln!(f, "  ms/step             {:>10.1}", self.ms_per_step)?;
        writeln!(f, "  tokens/s            {:>10.0}", self.tokens_per_s)?;
        writeln!(f, "  device GFLOP/s      {:>10.1}  (kernel FLOPs / kernel time)", self.device_gflops)?;
        write!(f, "  total GFLOP/s       {:>10.1}  (all step FLOPs / train time)", self.total_gflops)
    }
}
