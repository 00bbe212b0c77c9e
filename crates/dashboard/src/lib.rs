//! A live dashboard for anetrain's training telemetry, and PNG plots of finished runs.
//!
//! The trainer writes JSON lines (docs/TELEMETRY.md, `train::telemetry::Event`); this
//! crate reads them leniently ([`parse`]: a truncated or foreign line is counted, never
//! fatal), rebuilds the run over resumes and restarts ([`run`]), and shows it: in a
//! terminal ([`ui`] draws a frame, [`app`] runs the live loop: tailing a file or a
//! training child, sampling text from checkpoints on a thread, CPU/RSS/power from
//! [`system`]), or as PNG charts ([`plot`]).
//!
//! ```no_run
//! let log = dashboard::run::RunLog::read_file("runs/default/telemetry.jsonl".as_ref())?;
//! let run = log.current().expect("the file has a run");
//! println!("{} steps, {} malformed lines", run.steps.len(), log.stats.malformed);
//! dashboard::plot::plot_files(&[("default".into(), log)], "loss.png".as_ref(), (1200, 900))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod app;
pub mod parse;
pub mod plot;
pub mod run;
pub mod sampler;
pub mod screenshot;
pub mod system;
pub mod ui;
