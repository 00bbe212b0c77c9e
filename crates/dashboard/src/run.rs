//! A training run as its telemetry tells it: configuration, per-step series, evaluations,
//! checkpoints, restarts and the final report — rebuilt event by event, correct over
//! resumes and `exec()` restarts.
//!
//! A file holds one or more runs. A `start` event with `resumed_from_step: k` continues
//! the current run: the steps after `k` that the dead process had logged are redone by
//! the new one (bit-identically, from the checkpoint), so they are dropped and replaced,
//! and the curve gets a marker at `k`. A `start` without `resumed_from_step` after steps
//! begins a new run in the same file.

use std::path::Path;

use llama::Config;
use train::telemetry::{Event, PhasesMs, Report};

use crate::parse::{parse_line, Parsed, Tail};

/// The `start` event's description of the run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunInfo {
    pub config: Config,
    pub n_params: usize,
    pub tokens_per_step: usize,
    pub flops_per_step: f64,
    pub device: String,
    pub precision: String,
    pub pipeline: String,
    /// The resolved training settings (`steps`, `lr`, `batch`, …), as the trainer wrote them.
    pub settings: serde_json::Value,
}

impl RunInfo {
    /// A numeric training setting, if present.
    pub fn setting(&self, name: &str) -> Option<f64> {
        self.settings.get(name).and_then(serde_json::Value::as_f64)
    }
}

/// One optimizer step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepPoint {
    pub step: u64,
    pub loss: f32,
    pub lr: f32,
    pub grad_norm: f32,
    pub tokens_per_s: f64,
    pub gflops: f64,
    pub ms: f64,
    pub phases: PhasesMs,
    pub compile_stall_ms: f64,
}

/// Why the curve has a seam at a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkerKind {
    /// The trainer `exec()`ed itself for a fresh compile budget (a `restart` event).
    Restart,
    /// A new process continued the run from a checkpoint (`--resume`, after a stop or crash).
    Resume,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Marker {
    pub step: u64,
    pub kind: MarkerKind,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub step: u64,
    pub path: String,
}

/// Everything known about one run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Run {
    /// From the latest `start` event; `None` while the file has not shown one.
    pub info: Option<RunInfo>,
    /// Increasing by step.
    pub steps: Vec<StepPoint>,
    /// `(step, val_loss)`, increasing by step.
    pub evals: Vec<(u64, f32)>,
    pub checkpoints: Vec<Checkpoint>,
    pub markers: Vec<Marker>,
    /// `start` events seen: processes that worked on this run.
    pub processes: usize,
    /// Steps logged by a process that died before checkpointing them, redone after a resume.
    pub replayed_steps: usize,
    /// The Efficiency Report of the `end` event, once the run has ended.
    pub report: Option<Report>,
}

impl Run {
    pub fn last_step(&self) -> Option<&StepPoint> {
        self.steps.last()
    }

    /// The last `n` steps (fewer at the start).
    pub fn recent(&self, n: usize) -> &[StepPoint] {
        &self.steps[self.steps.len().saturating_sub(n)..]
    }

    /// Steps the run is configured for.
    pub fn total_steps(&self) -> Option<u64> {
        self.info.as_ref()?.setting("steps").map(|s| s as u64)
    }

    pub fn latest_eval(&self) -> Option<(u64, f32)> {
        self.evals.last().copied()
    }

    pub fn latest_checkpoint(&self) -> Option<&Checkpoint> {
        self.checkpoints.last()
    }

    /// Mean of `f` over the last `n` steps.
    pub fn recent_mean(&self, n: usize, f: impl Fn(&StepPoint) -> f64) -> Option<f64> {
        let recent = self.recent(n);
        (!recent.is_empty()).then(|| recent.iter().map(f).sum::<f64>() / recent.len() as f64)
    }

    /// Mean phase times over the last `n` steps.
    pub fn recent_phases(&self, n: usize) -> Option<PhasesMs> {
        let recent = self.recent(n);
        if recent.is_empty() {
            return None;
        }
        let k = recent.len() as f64;
        let mean = |f: fn(&PhasesMs) -> f64| recent.iter().map(|s| f(&s.phases)).sum::<f64>() / k;
        Some(PhasesMs {
            device_forward: mean(|p| p.device_forward),
            device_backward: mean(|p| p.device_backward),
            surface_io: mean(|p| p.surface_io),
            rmsnorm: mean(|p| p.rmsnorm),
            classifier_loss: mean(|p| p.classifier_loss),
            dw: mean(|p| p.dw),
            optimizer: mean(|p| p.optimizer),
            other: mean(|p| p.other),
        })
    }

    /// Seconds to the last configured step at the recent pace; `None` when unknown or done.
    pub fn eta_seconds(&self, recent: usize) -> Option<f64> {
        let remaining = self.total_steps()?.checked_sub(self.last_step()?.step).filter(|&r| r > 0)?;
        Some(remaining as f64 * self.recent_mean(recent, |s| s.ms)? / 1e3)
    }

    /// Total time steps waited for a background compile.
    pub fn compile_stall_ms(&self) -> f64 {
        self.steps.iter().map(|s| s.compile_stall_ms).sum()
    }

    fn is_empty(&self) -> bool {
        self.info.is_none() && self.steps.is_empty() && self.evals.is_empty()
    }

    /// Forgets what comes after step `k`: a new process redoes it.
    fn rewind_to(&mut self, k: u64) {
        let before = self.steps.len();
        self.steps.retain(|s| s.step <= k);
        self.replayed_steps += before - self.steps.len();
        self.evals.retain(|&(s, _)| s <= k);
        self.checkpoints.retain(|c| c.step <= k);
        self.markers.retain(|m| m.step <= k);
        self.report = None;
    }
}

/// Counts of what the lines were.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LineStats {
    /// Lines read, blank ones included.
    pub lines: usize,
    pub events: usize,
    /// Lines (or parts of a line) that are not telemetry.
    pub malformed: usize,
    /// Events of a kind this reader does not know.
    pub unknown: usize,
    /// The latest malformed line: its number and why.
    pub last_malformed: Option<(usize, String)>,
}

/// All runs of a telemetry file, and what its lines were.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunLog {
    /// Oldest first; the last one is the run being followed.
    pub runs: Vec<Run>,
    pub stats: LineStats,
}

impl RunLog {
    /// Reads a whole file: a finished run, or a running one up to now. An incomplete last
    /// line counts as malformed (whoever reads a file at once treats it as finished).
    pub fn read_file(path: &Path) -> std::io::Result<RunLog> {
        let mut log = RunLog::default();
        let mut tail = Tail::new(path);
        // `Tail` returns nothing for a missing file (it waits for it); here that is an error.
        std::fs::metadata(path)?;
        for (n, line) in tail.poll()?.lines.into_iter().chain(tail.finish()) {
            log.ingest(n, &line);
        }
        Ok(log)
    }

    /// Parses text, one line after the other (for tests and fixtures).
    pub fn from_text(text: &str) -> RunLog {
        let mut log = RunLog::default();
        for (i, line) in text.lines().enumerate() {
            log.ingest(i + 1, line);
        }
        log
    }

    /// The run being followed (the file's last).
    pub fn current(&self) -> Option<&Run> {
        self.runs.last()
    }

    /// Takes one line of telemetry; whatever it holds, it is counted.
    pub fn ingest(&mut self, line_no: usize, line: &str) {
        self.stats.lines += 1;
        for parsed in parse_line(line) {
            match parsed {
                Parsed::Event(event) => {
                    self.stats.events += 1;
                    self.apply(*event);
                }
                Parsed::Unknown(_) => self.stats.unknown += 1,
                Parsed::Malformed(reason) => {
                    self.stats.malformed += 1;
                    self.stats.last_malformed = Some((line_no, reason));
                }
            }
        }
    }

    fn run_mut(&mut self) -> &mut Run {
        if self.runs.is_empty() {
            self.runs.push(Run::default());
        }
        self.runs.last_mut().expect("pushed above")
    }

    /// Applies one event to the current run (or starts a new one).
    pub fn apply(&mut self, event: Event) {
        match event {
            Event::Start {
                config,
                n_params,
                tokens_per_step,
                flops_per_step,
                device,
                precision,
                pipeline,
                settings,
                resumed_from_step,
            } => {
                let info = RunInfo {
                    config,
                    n_params,
                    tokens_per_step,
                    flops_per_step,
                    device,
                    precision,
                    pipeline,
                    settings,
                };
                if resumed_from_step.is_none() && self.current().is_some_and(|r| !r.is_empty()) {
                    self.runs.push(Run::default());
                }
                let run = self.run_mut();
                if let Some(k) = resumed_from_step {
                    run.rewind_to(k);
                    // An exec() restart announced itself; a resume after a stop or crash did not.
                    if !run.markers.iter().any(|m| m.step == k && m.kind == MarkerKind::Restart) {
                        run.markers.push(Marker { step: k, kind: MarkerKind::Resume });
                    }
                }
                run.info = Some(info);
                run.processes += 1;
            }
            Event::Step {
                step,
                loss,
                lr,
                grad_norm,
                tokens_per_s,
                gflops,
                ms,
                phases_ms,
                loss_scale: _,
                compile_stall_ms,
                loss_tokens: _,
            } => {
                let run = self.run_mut();
                // A step number seen before without a `start` between (a writer that
                // lost its resume event): the newer line wins.
                if run.last_step().is_some_and(|s| s.step >= step) {
                    run.rewind_to(step.saturating_sub(1));
                }
                run.steps.push(StepPoint {
                    step,
                    loss,
                    lr,
                    grad_norm,
                    tokens_per_s,
                    gflops,
                    ms,
                    phases: phases_ms,
                    compile_stall_ms: compile_stall_ms.unwrap_or(0.0),
                });
            }
            Event::Eval { step, val_loss } => {
                let evals = &mut self.run_mut().evals;
                evals.retain(|&(s, _)| s < step);
                evals.push((step, val_loss));
            }
            Event::Checkpoint { step, path } => self.run_mut().checkpoints.push(Checkpoint { step, path }),
            Event::Restart { step, compiles_done: _ } => {
                self.run_mut().markers.push(Marker { step, kind: MarkerKind::Restart });
            }
            Event::End { report } => self.run_mut().report = Some(report),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(resumed: Option<u64>) -> String {
        let resumed = resumed.map_or("null".to_string(), |k| k.to_string());
        format!(
            r#"{{"event":"start","config":{{"dim":64,"hidden_dim":192,"n_layers":4,"n_heads":4,"n_kv_heads":2,"vocab_size":512,"seq_len":128,"norm_eps":0.00001,"rope_theta":10000.0,"qkv_bias":false,"shared_classifier":true}},"n_params":229952,"tokens_per_step":1024,"flops_per_step":1.8e9,"device":"cpu","precision":"fp32","pipeline":"dynamic","settings":{{"steps":10,"lr":0.002}},"resumed_from_step":{resumed}}}"#
        )
    }

    fn step(n: u64, loss: f32) -> String {
        format!(
            r#"{{"event":"step","step":{n},"loss":{loss},"lr":0.001,"grad_norm":0.5,"tokens_per_s":1000.0,"gflops":2.0,"ms":100.0,"phases_ms":{{"device_forward":10.0,"device_backward":20.0,"surface_io":5.0,"rmsnorm":1.0,"classifier_loss":4.0,"dw":30.0,"optimizer":2.0,"other":3.0}}}}"#
        )
    }

    fn steps(run: &Run) -> Vec<(u64, f32)> {
        run.steps.iter().map(|s| (s.step, s.loss)).collect()
    }

    #[test]
    fn events_build_the_run() {
        let text = [
            start(None),
            step(1, 6.0),
            step(2, 5.5),
            r#"{"event":"eval","step":2,"val_loss":5.6}"#.into(),
            r#"{"event":"checkpoint","step":2,"path":"runs/a/ckpt.bin"}"#.into(),
            step(3, 5.0),
        ]
        .join("\n");
        let log = RunLog::from_text(&text);
        assert_eq!(log.runs.len(), 1);
        let run = log.current().unwrap();
        assert_eq!(run.info.as_ref().unwrap().config.dim, 64);
        assert_eq!(run.total_steps(), Some(10));
        assert_eq!(steps(run), vec![(1, 6.0), (2, 5.5), (3, 5.0)]);
        assert_eq!(run.latest_eval(), Some((2, 5.6)));
        assert_eq!(run.latest_checkpoint().unwrap().path, "runs/a/ckpt.bin");
        // 7 steps to go at 100 ms each.
        assert_eq!(run.eta_seconds(20), Some(0.7));
        assert_eq!(run.recent_phases(2).unwrap().dw, 30.0);
        assert_eq!(log.stats, LineStats { lines: 6, events: 6, ..LineStats::default() });
    }

    #[test]
    fn a_resume_replaces_the_steps_the_dead_process_logged_after_its_checkpoint() {
        // Checkpoint at 2, crash after logging step 4 (and a truncated step 5), resume from 2.
        let text = [
            start(None),
            step(1, 6.0),
            step(2, 5.5),
            r#"{"event":"checkpoint","step":2,"path":"c.bin"}"#.into(),
            step(3, 5.0),
            r#"{"event":"eval","step":3,"val_loss":5.1}"#.into(),
            step(4, 4.5),
            format!("{}{}", &step(5, 4.0)[..40], start(Some(2))),
            step(3, 5.01),
            step(4, 4.51),
        ]
        .join("\n");
        let log = RunLog::from_text(&text);
        assert_eq!(log.runs.len(), 1, "a resume continues the run");
        let run = log.current().unwrap();
        assert_eq!(steps(run), vec![(1, 6.0), (2, 5.5), (3, 5.01), (4, 4.51)]);
        assert_eq!(run.evals, vec![], "the evaluation at step 3 was redone by nobody yet");
        assert_eq!(run.markers, vec![Marker { step: 2, kind: MarkerKind::Resume }]);
        assert_eq!((run.processes, run.replayed_steps), (2, 2));
        assert_eq!(log.stats.malformed, 1);
        assert_eq!(log.stats.last_malformed.as_ref().unwrap().0, 8);
    }

    #[test]
    fn an_exec_restart_is_one_marker_not_two() {
        let text = [
            start(None),
            step(1, 6.0),
            step(2, 5.5),
            r#"{"event":"restart","step":2,"compiles_done":119}"#.into(),
            start(Some(2)),
            step(3, 5.0),
        ]
        .join("\n");
        let run = RunLog::from_text(&text).runs.pop().unwrap();
        assert_eq!(run.markers, vec![Marker { step: 2, kind: MarkerKind::Restart }]);
        assert_eq!(steps(&run).len(), 3);
    }

    #[test]
    fn a_fresh_start_after_steps_begins_a_new_run() {
        let text = [start(None), step(1, 6.0), start(None), step(1, 7.0), step(2, 6.5)].join("\n");
        let log = RunLog::from_text(&text);
        assert_eq!(log.runs.len(), 2);
        assert_eq!(steps(&log.runs[0]), vec![(1, 6.0)]);
        assert_eq!(steps(log.current().unwrap()), vec![(1, 7.0), (2, 6.5)]);
    }

    #[test]
    fn events_before_any_start_still_count() {
        // A file that begins in the middle (its head was rotated away).
        let log = RunLog::from_text(&[step(7, 3.0), "garbage".into(), step(8, 2.9)].join("\n"));
        let run = log.current().unwrap();
        assert!(run.info.is_none());
        assert_eq!(run.total_steps(), None);
        assert_eq!(run.eta_seconds(20), None);
        assert_eq!(steps(run), vec![(7, 3.0), (8, 2.9)]);
        assert_eq!(log.stats.malformed, 1);
        assert_eq!(log.stats.last_malformed.as_ref().unwrap().0, 2);
    }

    #[test]
    fn reading_a_file_counts_a_truncated_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        let whole = step(2, 5.5);
        std::fs::write(&path, format!("{}\n{}\n{}", start(None), step(1, 6.0), &whole[..whole.len() - 9])).unwrap();
        let log = RunLog::read_file(&path).unwrap();
        assert_eq!(log.stats.lines, 3);
        assert_eq!(log.stats.malformed, 1);
        assert_eq!(steps(log.current().unwrap()), vec![(1, 6.0)]);
        let missing = RunLog::read_file(&dir.path().join("nope.jsonl")).unwrap_err();
        assert_eq!(missing.kind(), std::io::ErrorKind::NotFound);
    }
}
