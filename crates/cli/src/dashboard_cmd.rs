//! `anetrain dashboard` (a live terminal view of a training run) and `anetrain plot`
//! (PNG charts of telemetry files). The work is in the `dashboard` crate; this parses
//! flags and prints.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use dashboard::app::{self, Options, Source};
use dashboard::run::RunLog;
use dashboard::sampler::SampleSettings;

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    anetrain dashboard --follow runs/default/telemetry.jsonl\n  \
    anetrain dashboard -- anetrain train --steps 300\n\n\
    Keys: q, Esc or Ctrl-C quit (a training started by the dashboard is stopped; resume it with --resume).")]
pub struct DashboardArgs {
    /// Follow this telemetry file as it grows; a finished file is replayed.
    #[arg(long, value_name = "FILE")]
    pub follow: Option<PathBuf>,
    /// Sample text from the newest checkpoint once it is this many steps newer than the
    /// last one sampled (0: never).
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub sample_every: u64,
    /// Positions of sample text to generate (capped at the model's context).
    #[arg(long, value_name = "N", default_value_t = 120)]
    pub sample_tokens: usize,
    /// Write one frame of the dashboard (of --follow FILE as it is now) to this PNG
    /// instead of running the live view; needs no terminal.
    #[arg(long, value_name = "FILE.png", requires = "follow")]
    pub screenshot: Option<PathBuf>,
    /// Size of the --screenshot in terminal cells.
    #[arg(long, value_name = "COLSxROWS", default_value = "120x36", value_parser = parse_cells)]
    pub screenshot_size: (u16, u16),
    /// Keep the temporary folder with the training's log and telemetry after a clean
    /// exit (it is removed then, and kept when the training failed or was stopped).
    #[arg(long)]
    pub keep_files: bool,
    /// (testing) panic after the first frame, to check that the terminal is restored.
    #[arg(long = "debug-panic-after-first-frame", hide = true)]
    pub panic_after_first_frame: bool,
    /// The training to start and watch, after `--`: its `--telemetry` goes to a temporary
    /// file unless given, and its output to a log file. `anetrain` means this binary.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

fn parse_cells(s: &str) -> Result<(u16, u16), String> {
    let (cols, rows) = s.split_once(['x', 'X']).ok_or_else(|| format!("`{s}` is not COLSxROWS, e.g. 120x36"))?;
    let parse = |v: &str, what: &str| {
        v.trim()
            .parse::<u16>()
            .ok()
            .filter(|&n| (10..=1000).contains(&n))
            .ok_or_else(|| format!("{what} `{v}` is not a number from 10 to 1000"))
    };
    Ok((parse(cols, "columns")?, parse(rows, "rows")?))
}

pub fn dashboard(args: DashboardArgs) -> Result<()> {
    let source = match (&args.follow, args.command.is_empty()) {
        (Some(_), false) => bail!("give either --follow FILE or a command after `--`, not both"),
        (None, true) => {
            bail!("nothing to watch: give --follow FILE, or a training command after `--` (-- anetrain train …)")
        }
        (Some(file), true) => Source::Follow(file.clone()),
        (None, false) => Source::Command(args.command.clone()),
    };
    let sample = SampleSettings { tokens: args.sample_tokens, ..SampleSettings::default() };
    if let Some(png) = &args.screenshot {
        let telemetry = args.follow.as_deref().expect("clap requires --follow with --screenshot");
        let sample = (args.sample_every > 0).then_some(sample);
        app::screenshot(telemetry, png, args.screenshot_size, sample)?;
        eprintln!("wrote {}", png.display());
        return Ok(());
    }
    let options = Options {
        source,
        sample_every: args.sample_every,
        sample,
        panic_after_first_frame: args.panic_after_first_frame,
        keep_files: args.keep_files,
    };
    for note in app::run(options)? {
        eprintln!("{note}");
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// Telemetry files (JSON lines); several runs are overlaid, labelled by file name.
    #[arg(required = true, value_name = "TELEMETRY")]
    pub telemetry: Vec<PathBuf>,
    /// The PNG to write.
    #[arg(long, value_name = "FILE.png")]
    pub out: PathBuf,
    /// Image width in pixels.
    #[arg(long, default_value_t = 1200)]
    pub width: u32,
    /// Image height in pixels.
    #[arg(long, default_value_t = 900)]
    pub height: u32,
}

/// Labels for files: their stems, or their paths where two stems are the same.
fn labels(paths: &[PathBuf]) -> Vec<String> {
    let stem = |p: &Path| p.file_stem().map_or_else(|| p.display().to_string(), |s| s.to_string_lossy().into_owned());
    let stems: Vec<String> = paths.iter().map(|p| stem(p)).collect();
    paths
        .iter()
        .zip(&stems)
        .map(|(p, s)| if stems.iter().filter(|t| *t == s).count() > 1 { p.display().to_string() } else { s.clone() })
        .collect()
}

pub fn plot(args: PlotArgs) -> Result<()> {
    let mut files = Vec::new();
    for (path, label) in args.telemetry.iter().zip(labels(&args.telemetry)) {
        let log = RunLog::read_file(path).with_context(|| format!("cannot read telemetry {}", path.display()))?;
        if log.stats.malformed > 0 {
            let (line, reason) = log.stats.last_malformed.clone().unwrap_or_default();
            eprintln!(
                "{}: skipped {} malformed line{} (last: line {line}: {reason})",
                path.display(),
                log.stats.malformed,
                if log.stats.malformed == 1 { "" } else { "s" }
            );
        }
        files.push((label, log));
    }
    dashboard::plot::plot_files(&files, &args.out, (args.width, args.height))?;
    for (label, run) in dashboard::plot::label_runs(&files) {
        let last = run.last_step().expect("plotted runs have steps");
        let val = run.latest_eval().map_or(String::new(), |(s, v)| format!(", val {v:.4} at step {s}"));
        eprintln!("{label}: {} steps, loss {:.4} at step {}{val}", run.steps.len(), last.loss, last.step);
    }
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_parse_and_bad_sizes_say_why() {
        assert_eq!(parse_cells("120x36"), Ok((120, 36)));
        assert_eq!(parse_cells("80X24"), Ok((80, 24)));
        assert!(parse_cells("120").unwrap_err().contains("COLSxROWS"));
        assert!(parse_cells("5x24").unwrap_err().contains("columns `5`"));
        assert!(parse_cells("80xlots").unwrap_err().contains("rows `lots`"));
    }

    #[test]
    fn labels_are_stems_unless_two_collide() {
        let paths: Vec<PathBuf> = ["a/telemetry.jsonl", "b/telemetry.jsonl", "c/other.jsonl"].map(PathBuf::from).into();
        assert_eq!(labels(&paths), ["a/telemetry.jsonl", "b/telemetry.jsonl", "other"]);
    }
}
