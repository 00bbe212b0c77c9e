//! `anetrain bench train --device ane-model`: a training step's time on an ANE, predicted
//! by `train::cost_model` from the kernels and schedule anetrain would run there.
//! Nothing here runs on an ANE; every figure printed is a prediction.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use train::cost_model::{self, Chip, Fusion, Fusions, Prediction, StepShape};
use train::pipelines::PipelineConfig;

/// What `bench train --device ane-model` was asked.
pub struct ModelArgs {
    pub model: String,
    pub batch: usize,
    pub seq: usize,
    pub chip: String,
    pub probe_json: Option<PathBuf>,
    pub pipeline: PipelineConfig,
    pub fusions: String,
    /// Micro-batches per optimizer step (staged weights are copied once per step).
    pub accum: usize,
    pub json: bool,
}

/// Reads `--probe-json`: a report that `anetrain probe --json` wrote.
pub(crate) fn read_probe(path: &std::path::Path) -> Result<device::probe::ProbeReport> {
    let text = std::fs::read_to_string(path).with_context(|| format!("--probe-json {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!("--probe-json {}: not a report of `anetrain probe --json` (JSON with results)", path.display())
    })
}

pub fn run(a: &ModelArgs) -> Result<()> {
    let params_config = crate::bench::model_or_preset_config(&a.model)?;
    if a.seq == 0 || a.seq > params_config.seq_len {
        bail!("--seq {} must be between 1 and the model's context of {}", a.seq, params_config.seq_len);
    }
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if a.accum == 0 {
        bail!("--accum must be at least 1");
    }
    a.pipeline.validate().map_err(anyhow::Error::msg)?;
    let Some(mut chip) = Chip::named(&a.chip) else {
        bail!("--chip {}: not a chip the model knows ({})", a.chip, cost_model::chip_names().join(", "));
    };
    if let Some(path) = &a.probe_json {
        let report = read_probe(path)?;
        chip = chip.with_probe(&report, &path.display().to_string()).map_err(anyhow::Error::msg)?.0;
    }
    let fusions = cost_model::parse_fusions(&a.fusions).map_err(|e| anyhow::anyhow!("--fusions: {e}"))?;
    let shape = StepShape {
        config: params_config.clone(),
        batch: a.batch,
        seq: a.seq,
        dialect: chip.dialect(),
        accum: a.accum,
    };
    let plan = cost_model::plan(&shape, a.pipeline, &fusions)?;
    let p = cost_model::predict(&plan, &chip);
    let gains = cost_model::fusion_gains(&shape, a.pipeline, &chip)?;
    let none_ms = cost_model::predict(&cost_model::plan(&shape, a.pipeline, &Fusions::new())?, &chip).ms_per_step;
    let all: Fusions = Fusion::ALL.into_iter().collect();
    let all_ms = cost_model::predict(&cost_model::plan(&shape, a.pipeline, &all)?, &chip).ms_per_step;
    let gains = Gains { each: gains, none_ms, all_ms };
    let optimizer_ms = cost_model::optimizer_ms(&params_config, &chip);
    let tokens = (a.batch * a.seq) as f64;
    if a.json {
        print_json(a, &params_config, &p, &gains, optimizer_ms, tokens);
    } else {
        print_text(a, &params_config, &p, &gains, optimizer_ms, tokens)?;
    }
    Ok(())
}

/// The fusions priced: each alone on top of the pipeline as anetrain runs it (`none_ms`),
/// and all together.
struct Gains {
    each: Vec<(Fusion, Option<f64>)>,
    none_ms: f64,
    all_ms: f64,
}

/// One line, with the keys of `bench train --json` (measured-only figures null) and the
/// model's own.
fn print_json(a: &ModelArgs, config: &llama::Config, p: &Prediction, gains: &Gains, optimizer_ms: f64, tokens: f64) {
    let secs = p.ms_per_step / 1e3;
    let flops = p.ane_flops + p.cpu_gemm_flops;
    let phases: BTreeMap<String, f64> = p.main_ms.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let fusion_ms: BTreeMap<&str, Option<f64>> = gains.each.iter().map(|(f, ms)| (f.name(), *ms)).collect();
    let v = serde_json::json!({
        "model": a.model, "params": config.n_params(), "batch": a.batch, "seq": a.seq, "steps": 1,
        "rounds": 1, "device": "ane-model", "precision": "fp16",
        "ms_per_step": p.ms_per_step, "tokens_per_s": tokens / secs, "gflops": flops / secs / 1e9,
        "gemm_peak_gflops": null, "ratio_to_gemm_peak": null,
        "peak_rss_bytes": null, "theoretical_min_bytes": null, "activation_bytes": null,
        "bytes_per_param_at_peak": null,
        "phases_ms": phases,
        "pytorch_measured_tokens_per_s": null, "pytorch_compile": false, "pytorch_measured_runs": [],
        "flops_per_token": flops / tokens,
        "floor_ms_per_step": null, "ceiling_tokens_per_s": null,
        "pytorch_reference_tokens_per_s": {},
        "predicted": true, "accum": a.accum, "chip": p.chip.name, "chip_figures": p.chip.from, "schedule": p.label,
        "ane_ms": p.ane_ms(), "ane_tflops_peak": p.chip.ane_tflops, "fraction_of_peak": p.fraction_of_peak(),
        "evals_per_step": p.evals, "background_dw_ms": p.background_ms,
        "compile_ms_per_step": p.compile_ms, "optimizer_ms": optimizer_ms,
        "unfused_ms_per_step": gains.none_ms, "fusion_ms_per_step": fusion_ms,
        "all_fusions_ms_per_step": gains.all_ms,
    });
    println!("{v}");
}

fn print_text(
    a: &ModelArgs,
    config: &llama::Config,
    p: &Prediction,
    gains: &Gains,
    optimizer_ms: f64,
    tokens: f64,
) -> Result<()> {
    use std::fmt::Write as _;
    use std::io::Write as _;
    // The report is built whole and written once: a closed stdout (`| head`) is then an
    // error the caller ignores, not a panic.
    let mut o = String::new();
    macro_rules! out {
        ($($arg:tt)*) => { writeln!(o, $($arg)*).expect("writing to a String") };
    }
    let c = &p.chip;
    out!(
        "bench train: {} ({:.1} M params), batch {} × seq {}, on the ANE cost model of {}: predicted, not run on hardware",
        a.model,
        config.n_params() as f64 / 1e6,
        a.batch,
        a.seq,
        c.label
    );
    out!("  chip figures: {}", c.from);
    out!(
        "    ANE {:.2} TFLOPS fp16 (conv; matmul at 1/{}), dispatch {:.3} ms, surfaces {:.0} GB/s, SRAM cliff {:.0} MiB \
         (compute ×{} past it)",
        c.ane_tflops,
        cost_model::MATMUL_SLOWDOWN,
        c.dispatch_ms,
        c.surface_gbs,
        c.sram_cliff_bytes / (1 << 20) as f64,
        cost_model::SPILL_SLOWDOWN
    );
    out!(
        "    CPU (Apple-core figures, not this machine's): GEMM {:.0} GFLOP/s (Accelerate on the matrix units), \
         one core streams {:.0} GB/s",
        c.cpu_gemm_gflops,
        c.cpu_stream_gbs
    );
    out!("  schedule: {} ({} surfaces; {} micro-batches per optimizer step)", p.label, c.dialect(), a.accum);
    out!(
        "  {:<28} {:>5} {:>10} {:>10} {:>9} {:>12} {:>9} {:>8}",
        "kernel",
        "evals",
        "GFLOP",
        "surface MB",
        "ms/eval",
        "bound",
        "ms/step",
        "of peak"
    );
    for r in &p.kernels {
        let t = r.time;
        let flops_per_s = r.work.flops() / (t.total_ms() * 1e-3);
        out!(
            "  {:<28} {:>5} {:>10.2} {:>10.1} {:>9.3} {:>12} {:>9.1} {:>7.1}%",
            r.work.name,
            r.evals,
            r.work.flops() / 1e9,
            r.work.io_bytes() / 1e6,
            t.total_ms(),
            if t.spilled { format!("{} (SRAM)", t.bound()) } else { t.bound().to_string() },
            r.total_ms(),
            100.0 * flops_per_s / (c.ane_tflops * 1e12)
        );
    }
    out!("  ANE busy {:.1} ms in {} evaluations", p.ane_ms(), p.evals);
    out!("  main thread per phase (ms):");
    for (phase, ms) in &p.main_ms {
        if *ms > 0.0 {
            out!("    {phase:<14} {ms:>9.1}  {:>5.1} %", 100.0 * ms / p.ms_per_step);
        }
    }
    if p.background_ms > 0.0 {
        out!("    (background dW queue: {:.1} ms, overlapped)", p.background_ms);
    }
    out!("  critical path: {}", p.critical_path());
    out!(
        "  predicted ms/step      {:>9.1}  (forward + backward, as the seed reports it; AdamW adds {:.1} ms per optimizer step)",
        p.ms_per_step, optimizer_ms
    );
    out!("  tokens/s               {:>9.1}", tokens / (p.ms_per_step / 1e3));
    out!(
        "  ANE TFLOPS             {:>9.2}  = {:.1} % of the {:.1} TFLOPS peak",
        p.ane_flops / (p.ms_per_step * 1e-3) / 1e12,
        100.0 * p.fraction_of_peak(),
        c.ane_tflops
    );
    if p.compile_ms > 0.0 {
        if p.background_compile {
            out!("  compile per step       {:>9.1}  (in the background; a step waits for it if longer)", p.compile_ms);
        } else {
            out!(
                "  compile per step       {:>9.1}  (not in ms/step: the seed reports train time only; the budget of ≈119 \
                 compiles per process restarts training)",
                p.compile_ms
            );
        }
    }
    let base = gains.none_ms;
    out!(
        "  fusions (issue 25; modelled, not yet in the pipelines), each alone on {} as anetrain runs it ({base:.1} ms/step):",
        a.pipeline.label()
    );
    let row = |name: &str, ms: f64, what: &str| {
        format!(
            "    {name:<14} {ms:>8.1} ms/step  {:>+7.1} ms ({:>+5.1} %)  {what}",
            ms - base,
            100.0 * (ms - base) / base
        )
    };
    for (f, ms) in &gains.each {
        match (ms, f.not_applicable(a.pipeline)) {
            (Some(ms), None) => out!("{}", row(f.name(), *ms, f.describe())),
            (_, Some(why)) => out!("    {:<14} {:>8}          n/a: {why}", f.name(), "—"),
            (None, None) => {}
        }
    }
    out!("{}", row("all", gains.all_ms, "every fusion that applies"));
    std::io::stdout().write_all(o.as_bytes())?;
    Ok(())
}
