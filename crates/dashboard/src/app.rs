//! The live dashboard: a loop that tails the telemetry (of a file, or of a training
//! child it started), measures the process and the machine, asks the sample worker for
//! text from new checkpoints, and redraws at most [`MAX_FPS`] times a second.
//!
//! The terminal is put back as it was on every way out: `q`, Esc or Ctrl-C, an error,
//! and a panic (ratatui's `try_init` installs a panic hook that restores the terminal
//! before the message is printed; the child is killed by its guard while unwinding).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event as TermEvent, KeyCode, KeyEventKind, KeyModifiers};

use crate::parse::Tail;
use crate::run::RunLog;
use crate::sampler::{SampleSettings, SampleWorker};
use crate::system::{PowerMeter, ProcMonitor};
use crate::ui::{self, Dashboard, SampleState, SourceStatus};

/// At most this many redraws a second: enough to look live, cheap over SSH.
pub const MAX_FPS: u32 = 10;
/// How often the telemetry file is read for new lines.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How often CPU, memory and power are sampled (rates need an interval this long to settle).
const SYSTEM_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{0}")]
    Usage(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AppError {
    let what = what.into();
    move |source| AppError::Io { what, source }
}

/// Where the telemetry comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// A file some other process writes (or wrote: a finished file is a replay).
    Follow(PathBuf),
    /// A training command to start, e.g. `["anetrain", "train", "--steps", "60"]`.
    Command(Vec<String>),
}

#[derive(Clone, Debug)]
pub struct Options {
    pub source: Source,
    /// Sample text from the newest checkpoint when it is at least this many steps newer
    /// than the last one sampled; 0 turns sampling off.
    pub sample_every: u64,
    pub sample: SampleSettings,
    /// Panics after the first frame (to test that a panic restores the terminal).
    pub panic_after_first_frame: bool,
    /// Keep the temporary folder of a training the dashboard started (its log and
    /// telemetry) after a clean exit; it is always kept when the training failed.
    pub keep_files: bool,
}

/// Lets a redraw through at most once per interval.
#[derive(Debug)]
pub struct FrameLimiter {
    interval: Duration,
    last: Option<Instant>,
}

impl FrameLimiter {
    pub fn new(max_per_second: u32) -> FrameLimiter {
        FrameLimiter { interval: Duration::from_secs(1) / max_per_second.max(1), last: None }
    }

    /// True (and counts a frame) if a frame may be drawn at `now`.
    pub fn ready(&mut self, now: Instant) -> bool {
        if self.last.is_some_and(|last| now < last + self.interval) {
            return false;
        }
        self.last = Some(now);
        true
    }

    /// When the next frame may be drawn.
    pub fn next_allowed(&self) -> Option<Instant> {
        self.last.map(|last| last + self.interval)
    }
}

/// The training process the dashboard started, with its telemetry and log files. Killed
/// when dropped, if still running: the dashboard owns it.
pub struct TrainChild {
    child: Child,
    pub telemetry: PathBuf,
    /// The child's stdout and stderr (kept off the screen the dashboard draws on).
    pub log: PathBuf,
    /// The command as the user gave it (without the `--telemetry` added), for the screen.
    pub command_line: String,
    exit: Option<std::process::ExitStatus>,
    /// The temporary folder (mode 0700) holding the log and, by default, the telemetry.
    pub dir: PathBuf,
    /// Whether `dir` outlives this value (else it is removed when dropped).
    pub keep: bool,
}

/// The command to run and the telemetry file it will write: the user's `--telemetry FILE`
/// if given, else `default_telemetry` appended. `anetrain` as the program means this very
/// binary (`current_exe`), so the dashboard and the trainer are the same build.
pub fn prepare_command(
    argv: &[String],
    default_telemetry: &Path,
    current_exe: Option<&Path>,
) -> Result<(Vec<String>, PathBuf), AppError> {
    let Some(program) = argv.first() else {
        return Err(AppError::Usage("no command given after `--` (try: -- anetrain train)".into()));
    };
    let mut argv = argv.to_vec();
    if program == "anetrain" {
        if let Some(exe) = current_exe {
            argv[0] = exe.display().to_string();
        }
    }
    let mut given = None;
    for (i, arg) in argv.iter().enumerate() {
        if arg == "--telemetry" {
            let value = argv.get(i + 1).ok_or_else(|| AppError::Usage("--telemetry needs a FILE".into()))?;
            given = Some(value.clone());
        } else if let Some(value) = arg.strip_prefix("--telemetry=") {
            given = Some(value.to_string());
        }
    }
    match given {
        Some(v) if v == "-" => Err(AppError::Usage(
            "the dashboard reads telemetry from a file: drop `--telemetry -` (it picks a file) or name one".into(),
        )),
        Some(v) => Ok((argv, PathBuf::from(v))),
        None => {
            argv.push("--telemetry".into());
            argv.push(default_telemetry.display().to_string());
            Ok((argv, default_telemetry.to_path_buf()))
        }
    }
}

impl TrainChild {
    /// Starts `argv` with its output in a log file, in a fresh temporary directory that
    /// only this user can read (0700: a training's log and telemetry are private). The
    /// directory is removed when the value is dropped unless `keep` is set.
    pub fn spawn(given: &[String], keep: bool) -> Result<TrainChild, AppError> {
        TrainChild::spawn_in(given, &std::env::temp_dir(), keep)
    }

    /// [`TrainChild::spawn`] with the temporary directory inside `parent`.
    pub fn spawn_in(given: &[String], parent: &Path, keep: bool) -> Result<TrainChild, AppError> {
        let mut builder = tempfile::Builder::new();
        builder.prefix("anetrain-dashboard-");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            builder.permissions(std::fs::Permissions::from_mode(0o700));
        }
        let dir = builder.tempdir_in(parent).map_err(io_err("cannot create a temporary directory"))?.keep();
        let exe = std::env::current_exe().ok();
        let (argv, telemetry) = prepare_command(given, &dir.join("telemetry.jsonl"), exe.as_deref())?;
        let log = dir.join("train.log");
        let out = std::fs::File::create(&log).map_err(io_err(format!("cannot create {}", log.display())))?;
        let err = out.try_clone().map_err(io_err(format!("cannot share {}", log.display())))?;
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(io_err(format!("cannot start `{}`", argv[0])))?;
        Ok(TrainChild { child, telemetry, log, command_line: given.join(" "), exit: None, dir, keep })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status once the child has exited (checked without waiting).
    pub fn poll_exit(&mut self) -> Option<std::process::ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Stops the child if it still runs; true if it had to be stopped.
    pub fn stop(&mut self) -> bool {
        if self.poll_exit().is_some() {
            return false;
        }
        let _ = self.child.kill();
        self.exit = self.child.wait().ok();
        true
    }
}

impl Drop for TrainChild {
    fn drop(&mut self) {
        self.stop();
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// "exit 0", "exit 3", "killed by signal 9".
pub fn describe_exit(status: std::process::ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return format!("killed by signal {signal}");
        }
    }
    status.code().map_or("exited".to_string(), |c| format!("exit {c}"))
}

/// The state behind the screen, updated by [`Session::tick`]; no terminal involved, so
/// tests drive it directly.
pub struct Session {
    pub dashboard: Dashboard,
    tail: Tail,
    child: Option<TrainChild>,
    monitor: ProcMonitor,
    monitor_label: String,
    power: PowerMeter,
    worker: Option<SampleWorker>,
    sample_every: u64,
    last_sample_request: Option<u64>,
    next_system: Instant,
}

impl Session {
    pub fn new(options: &Options) -> Result<Session, AppError> {
        let (tail, child, source) = match &options.source {
            Source::Follow(path) => {
                check_followable(path)?;
                (Tail::new(path), None, format!("following {}", path.display()))
            }
            Source::Command(argv) => {
                let child = TrainChild::spawn(argv, options.keep_files)?;
                let source = format!("{} (pid {})", child.command_line, child.pid());
                (Tail::new(&child.telemetry), Some(child), source)
            }
        };
        let mut dashboard = Dashboard::new(source);
        let (monitor, monitor_label) = match &child {
            Some(c) => (ProcMonitor::new(c.pid()), format!("training, pid {}", c.pid())),
            None => {
                let pid = std::process::id();
                (ProcMonitor::new(pid), format!("this dashboard, pid {pid} (the trainer's is unknown)"))
            }
        };
        if let Some(c) = &child {
            dashboard.status = SourceStatus::Running;
            dashboard.child_log = Some(c.log.display().to_string());
        }
        let power = PowerMeter::detect();
        let worker = (options.sample_every > 0).then(|| SampleWorker::spawn(options.sample));
        if worker.is_none() {
            dashboard.sample = SampleState::Idle("sampling is off (--sample-every 0)".into());
        }
        Ok(Session {
            dashboard,
            tail,
            child,
            monitor,
            monitor_label,
            power,
            worker,
            sample_every: options.sample_every,
            last_sample_request: None,
            next_system: Instant::now(),
        })
    }

    /// Reads new telemetry, child status, measurements and samples; true if anything
    /// the screen shows changed.
    pub fn tick(&mut self, now: Instant) -> bool {
        let mut dirty = self.read_telemetry();
        if let Some(status) = self.child.as_mut().and_then(TrainChild::poll_exit) {
            if !matches!(self.dashboard.status, SourceStatus::Exited { .. }) {
                // The writer is gone: whatever it left is all there is.
                self.read_telemetry();
                if let Some((n, line)) = self.tail.finish() {
                    self.dashboard.log.ingest(n, &line);
                }
                self.dashboard.pending_bytes = 0;
                self.dashboard.status = SourceStatus::Exited { success: status.success(), how: describe_exit(status) };
                dirty = true;
            }
        }
        if now >= self.next_system {
            self.next_system = now + SYSTEM_INTERVAL;
            let running = !matches!(self.dashboard.status, SourceStatus::Exited { .. });
            let stats = if running { self.monitor.sample(now) } else { Err("the training has exited".into()) };
            self.dashboard.process = Some((self.monitor_label.clone(), stats));
            self.dashboard.power = (self.power.what.to_string(), self.power.read(now));
            dirty = true;
        }
        dirty |= self.update_sample();
        dirty
    }

    fn read_telemetry(&mut self) -> bool {
        match self.tail.poll() {
            Ok(poll) => {
                if poll.restarted {
                    self.dashboard.log = RunLog::default();
                    self.last_sample_request = None;
                }
                let changed = poll.restarted || !poll.lines.is_empty() || self.dashboard.read_error.is_some();
                self.dashboard.read_error = None;
                for (n, line) in poll.lines {
                    self.dashboard.log.ingest(n, &line);
                }
                self.dashboard.pending_bytes = self.tail.pending_bytes();
                changed
            }
            Err(e) => {
                // Shown, and tried again at the next poll (a file being replaced, say).
                self.dashboard.read_error = Some(format!("reading {}: {e}", self.tail.path().display()));
                true
            }
        }
    }

    fn update_sample(&mut self) -> bool {
        let Some(worker) = &mut self.worker else { return false };
        let mut dirty = false;
        if let Some(done) = worker.try_recv() {
            self.dashboard.sample = SampleState::Done(done);
            dirty = true;
        }
        let newest = self.dashboard.log.current().and_then(|r| r.latest_checkpoint()).cloned();
        let Some(ckpt) = newest else { return dirty };
        // Due when `sample_every` steps newer, or older (a new run began in the file).
        let due = self.last_sample_request.is_none_or(|last| ckpt.step >= last + self.sample_every || ckpt.step < last);
        if due && worker.busy_with().is_none() {
            let path = resolve_checkpoint(&ckpt.path, self.tail.path());
            worker.request(ckpt.step, path);
            self.last_sample_request = Some(ckpt.step);
            let previous = match std::mem::replace(&mut self.dashboard.sample, SampleState::Idle(String::new())) {
                SampleState::Done(s) => Some(s),
                SampleState::Working { previous, .. } => previous,
                SampleState::Idle(_) => None,
            };
            self.dashboard.sample = SampleState::Working { step: ckpt.step, previous };
            dirty = true;
        }
        dirty
    }

    /// Stops the training child if it still runs; what to tell the user afterwards.
    pub fn finish(mut self) -> Vec<String> {
        let mut notes = Vec::new();
        let last_step = self.dashboard.log.current().and_then(|r| r.last_step()).map(|s| s.step);
        let last_ckpt = self.dashboard.log.current().and_then(|r| r.latest_checkpoint()).map(|c| c.step);
        if let Some(mut child) = self.child.take() {
            if child.stop() {
                notes.push(format!(
                    "stopped the training at step {}{}",
                    last_step.map_or("?".into(), |s| s.to_string()),
                    last_ckpt
                        .map_or(String::new(), |c| format!(" (last checkpoint: step {c}; continue with --resume)"))
                ));
            } else if let Some(status) = child.exit {
                notes.push(format!("the training ended: {}", describe_exit(status)));
            }
            // A failed or stopped training's log is worth reading: kept whatever was asked.
            let clean = child.exit.is_some_and(|s| s.success());
            if !clean {
                child.keep = true;
            }
            if child.keep {
                notes.push(format!("training log: {}", child.log.display()));
                notes.push(format!("telemetry: {}", child.telemetry.display()));
            } else {
                notes.push(format!(
                    "removed {} (the training's log{}; --keep-files keeps them)",
                    child.dir.display(),
                    if child.telemetry.starts_with(&child.dir) { " and telemetry" } else { "" }
                ));
                if !child.telemetry.starts_with(&child.dir) {
                    notes.push(format!("telemetry: {}", child.telemetry.display()));
                }
            }
        }
        let stats = &self.dashboard.log.stats;
        if stats.malformed > 0 {
            notes.push(format!("{} malformed telemetry lines were skipped", stats.malformed));
        }
        notes
    }
}

/// A checkpoint path from the telemetry: as written if it exists (relative paths are the
/// trainer's, usually ours), else relative to the telemetry file's folder.
pub fn resolve_checkpoint(path: &str, telemetry: &Path) -> PathBuf {
    let as_written = PathBuf::from(path);
    if as_written.is_absolute() || as_written.exists() {
        return as_written;
    }
    match telemetry.parent() {
        Some(dir) if dir.join(&as_written).exists() => dir.join(as_written),
        _ => as_written,
    }
}

/// A file to follow must exist (a typo would otherwise wait forever) and be a file.
fn check_followable(path: &Path) -> Result<(), AppError> {
    let meta = std::fs::metadata(path).map_err(io_err(format!("cannot follow {}", path.display())))?;
    if meta.is_dir() {
        return Err(AppError::Usage(format!("{} is a directory, not a telemetry file", path.display())));
    }
    Ok(())
}

/// Runs the dashboard until the user quits; returns what to print once the terminal is back.
pub fn run(options: Options) -> Result<Vec<String>, AppError> {
    if let Source::Follow(path) = &options.source {
        check_followable(path)?;
    }
    if !std::io::stdout().is_terminal() {
        return Err(AppError::Usage(
            "the dashboard draws on a terminal and stdout is not one; for a picture use \
             --screenshot FILE.png, or `anetrain plot TELEMETRY --out FILE.png`"
                .into(),
        ));
    }
    let mut session = Session::new(&options)?;
    let mut terminal = ratatui::try_init().map_err(io_err("cannot set up the terminal"))?;
    let result = event_loop(&mut terminal, &mut session, options.panic_after_first_frame);
    ratatui::restore();
    result?;
    Ok(session.finish())
}

fn event_loop(
    terminal: &mut ratatui::DefaultTerminal,
    session: &mut Session,
    panic_after_first_frame: bool,
) -> Result<(), AppError> {
    let mut limiter = FrameLimiter::new(MAX_FPS);
    let mut dirty = true;
    let mut next_poll = Instant::now();
    loop {
        let now = Instant::now();
        if now >= next_poll {
            dirty |= session.tick(now);
            next_poll = now + POLL_INTERVAL;
        }
        if dirty && limiter.ready(now) {
            terminal.draw(|frame| ui::draw(frame, &session.dashboard)).map_err(io_err("drawing"))?;
            dirty = false;
            if panic_after_first_frame {
                panic!("--debug-panic: the dashboard panicked on purpose after its first frame");
            }
        }
        let mut wake = next_poll;
        if dirty {
            wake = wake.min(limiter.next_allowed().unwrap_or(now));
        }
        if event::poll(wake.saturating_duration_since(Instant::now())).map_err(io_err("reading the terminal"))? {
            match event::read().map_err(io_err("reading the terminal"))? {
                TermEvent::Key(key) if key.kind != KeyEventKind::Release => {
                    let ctrl_c = key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
                    if ctrl_c || matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) {
                        return Ok(());
                    }
                }
                // ratatui resizes its buffers on the next draw.
                TermEvent::Resize(..) => dirty = true,
                _ => {}
            }
        }
    }
}

/// Renders one frame of `telemetry` (as it is now) at `cols`×`rows` cells into a PNG,
/// without a terminal. The newest checkpoint is sampled when `sample` is given.
pub fn screenshot(
    telemetry: &Path,
    out: &Path,
    (cols, rows): (u16, u16),
    sample: Option<SampleSettings>,
) -> Result<(), AppError> {
    let log = RunLog::read_file(telemetry).map_err(io_err(format!("cannot read {}", telemetry.display())))?;
    let mut dashboard = Dashboard::new(format!("{}", telemetry.display()));
    let ckpt = log.current().and_then(|r| r.latest_checkpoint()).cloned();
    dashboard.log = log;
    let now = Instant::now();
    let mut power = PowerMeter::detect();
    dashboard.power = (power.what.to_string(), power.read(now));
    dashboard.sample = match (ckpt, sample) {
        (Some(c), Some(settings)) => {
            let path = resolve_checkpoint(&c.path, telemetry);
            let text = crate::sampler::sample_checkpoint(&path, &settings);
            SampleState::Done(crate::sampler::SampleText { step: c.step, checkpoint: path, text })
        }
        (None, _) => SampleState::Idle("no checkpoint in the telemetry".into()),
        (_, None) => SampleState::Idle("sampling is off".into()),
    };
    let backend = ratatui::backend::TestBackend::new(cols, rows);
    let mut terminal = ratatui::Terminal::new(backend).map_err(io_err("setting up the screen"))?;
    terminal.draw(|frame| ui::draw(frame, &dashboard)).map_err(io_err("drawing"))?;
    crate::screenshot::write_buffer_png(terminal.backend().buffer(), out).map_err(|e| AppError::Usage(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_command_gets_a_telemetry_file_unless_it_has_one() {
        let default = Path::new("/tmp/d/telemetry.jsonl");
        let exe = Path::new("/opt/bin/anetrain");
        let (argv, t) = prepare_command(&strings(&["anetrain", "train", "--steps", "5"]), default, Some(exe)).unwrap();
        assert_eq!(
            argv,
            strings(&["/opt/bin/anetrain", "train", "--steps", "5", "--telemetry", "/tmp/d/telemetry.jsonl"])
        );
        assert_eq!(t, default);

        let (argv, t) =
            prepare_command(&strings(&["./other", "train", "--telemetry", "mine.jsonl"]), default, Some(exe)).unwrap();
        assert_eq!(argv, strings(&["./other", "train", "--telemetry", "mine.jsonl"]));
        assert_eq!(t, PathBuf::from("mine.jsonl"));
        let (_, t) = prepare_command(&strings(&["anetrain", "train", "--telemetry=x.jsonl"]), default, None).unwrap();
        assert_eq!(t, PathBuf::from("x.jsonl"));

        let err = |argv: &[&str]| prepare_command(&strings(argv), default, None).unwrap_err().to_string();
        assert!(err(&[]).contains("no command"));
        assert!(err(&["anetrain", "train", "--telemetry", "-"]).contains("drop `--telemetry -`"));
        assert!(err(&["anetrain", "train", "--telemetry"]).contains("needs a FILE"));
    }

    #[cfg(unix)]
    #[test]
    fn the_training_folder_is_private_and_removed_unless_kept() {
        use std::os::unix::fs::PermissionsExt;
        let parent = tempfile::tempdir().unwrap();
        for keep in [false, true] {
            let mut child = TrainChild::spawn_in(&strings(&["true"]), parent.path(), keep).unwrap();
            let dir = child.dir.clone();
            assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
            while child.poll_exit().is_none() {
                std::thread::sleep(Duration::from_millis(5));
            }
            drop(child);
            assert_eq!(dir.exists(), keep, "keep = {keep}");
        }
    }

    #[test]
    fn frames_are_limited_to_the_rate() {
        let mut limiter = FrameLimiter::new(10);
        let t0 = Instant::now();
        assert!(limiter.ready(t0));
        assert!(!limiter.ready(t0 + Duration::from_millis(50)));
        assert_eq!(limiter.next_allowed(), Some(t0 + Duration::from_millis(100)));
        assert!(limiter.ready(t0 + Duration::from_millis(100)));
        // Over a simulated second of constant demand, at most 10 frames pass.
        let mut limiter = FrameLimiter::new(MAX_FPS);
        let frames = (0..1000).filter(|ms| limiter.ready(t0 + Duration::from_millis(*ms))).count();
        assert_eq!(frames, 10);
    }

    #[test]
    fn checkpoint_paths_fall_back_to_the_telemetry_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("run")).unwrap();
        std::fs::write(dir.path().join("run/ckpt.bin"), b"x").unwrap();
        let telemetry = dir.path().join("t.jsonl");
        assert_eq!(resolve_checkpoint("run/ckpt.bin", &telemetry), dir.path().join("run/ckpt.bin"));
        assert_eq!(resolve_checkpoint("gone/ckpt.bin", &telemetry), PathBuf::from("gone/ckpt.bin"));
        assert_eq!(resolve_checkpoint("/abs/ckpt.bin", &telemetry), PathBuf::from("/abs/ckpt.bin"));
    }

    #[test]
    fn a_session_follows_a_growing_file_and_asks_for_samples() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        std::fs::write(&path, "").unwrap();
        let options = Options {
            source: Source::Follow(path.clone()),
            sample_every: 10,
            sample: SampleSettings::default(),
            panic_after_first_frame: false,
            keep_files: false,
        };
        let mut session = Session::new(&options).unwrap();
        let t0 = Instant::now();
        session.tick(t0);
        assert!(session.dashboard.log.current().is_none());
        assert!(matches!(session.dashboard.process, Some((ref label, _)) if label.starts_with("this dashboard")));

        let step = |n: u64| {
            format!(
                r#"{{"event":"step","step":{n},"loss":3.0,"lr":0.001,"grad_norm":0.5,"tokens_per_s":1000.0,"gflops":2.0,"ms":100.0,"phases_ms":{{"device_forward":1.0,"device_backward":1.0,"surface_io":1.0,"rmsnorm":1.0,"classifier_loss":1.0,"dw":1.0,"optimizer":1.0,"other":1.0}}}}"#
            )
        };
        let ckpt = |n: u64| format!(r#"{{"event":"checkpoint","step":{n},"path":"missing/ckpt.bin"}}"#);
        let mut text = format!("{}\n{}\n{}\nnot json\n", step(1), step(2), ckpt(2));
        std::fs::write(&path, &text).unwrap();
        assert!(session.tick(t0));
        let run = session.dashboard.log.current().unwrap();
        assert_eq!(run.steps.len(), 2);
        assert_eq!(session.dashboard.log.stats.malformed, 1);
        assert!(matches!(session.dashboard.sample, SampleState::Working { step: 2, .. }));

        // The worker answers (with an error: the checkpoint is missing); a checkpoint
        // fewer than 10 steps newer is not sampled again.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(session.dashboard.sample, SampleState::Done(_)) {
            assert!(Instant::now() < deadline, "no sample came back");
            std::thread::sleep(Duration::from_millis(5));
            session.tick(t0);
        }
        text += &format!("{}\n{}\n", step(3), ckpt(3));
        std::fs::write(&path, &text).unwrap();
        session.tick(t0);
        assert!(matches!(session.dashboard.sample, SampleState::Done(ref s) if s.step == 2));
        text += &format!("{}\n{}\n", step(12), ckpt(12));
        std::fs::write(&path, &text).unwrap();
        session.tick(t0);
        assert!(matches!(session.dashboard.sample, SampleState::Working { step: 12, previous: Some(_) }));

        // A new run starts in the same file: its first checkpoint is older, and due.
        while !matches!(session.dashboard.sample, SampleState::Done(_)) {
            assert!(Instant::now() < deadline, "no sample came back");
            std::thread::sleep(Duration::from_millis(5));
            session.tick(t0);
        }
        let start = r#"{"event":"start","config":{"dim":64,"hidden_dim":192,"n_layers":4,"n_heads":4,"n_kv_heads":2,"vocab_size":512,"seq_len":128,"norm_eps":0.00001,"rope_theta":10000.0,"qkv_bias":false,"shared_classifier":true},"n_params":1,"tokens_per_step":1,"flops_per_step":1.0,"device":"cpu","precision":"fp32","pipeline":"dynamic","settings":{},"resumed_from_step":null}"#;
        text += &format!("{start}\n{}\n{}\n", step(1), ckpt(1));
        std::fs::write(&path, &text).unwrap();
        session.tick(t0);
        assert_eq!(session.dashboard.log.runs.len(), 2);
        assert!(matches!(session.dashboard.sample, SampleState::Working { step: 1, .. }));
        assert_eq!(session.finish(), vec!["1 malformed telemetry lines were skipped".to_string()]);
    }

    #[test]
    fn following_a_missing_file_or_a_folder_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let options = |p: PathBuf| Options {
            source: Source::Follow(p),
            sample_every: 0,
            sample: SampleSettings::default(),
            panic_after_first_frame: false,
            keep_files: false,
        };
        let missing = Session::new(&options(dir.path().join("nope.jsonl"))).err().unwrap().to_string();
        assert!(missing.starts_with("cannot follow ") && missing.contains("nope.jsonl"), "{missing}");
        let folder = Session::new(&options(dir.path().to_path_buf())).err().unwrap().to_string();
        assert!(folder.contains("is a directory"), "{folder}");
    }
}
