//! What the machine says about the training: CPU use and resident memory of a process
//! (Linux `/proc`), and power (Linux RAPL, macOS `powermetrics`). Anything that cannot be
//! measured here is "n/a" with the reason, never a guess.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Instant;

/// CPU use and memory of one process at one moment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProcStats {
    /// Percent of one core over the interval since the previous sample (can exceed 100
    /// with several threads); `None` on the first sample.
    pub cpu_percent: Option<f64>,
    pub rss_bytes: u64,
}

/// Samples one process's CPU time and RSS from `/proc/PID/{stat,status}`.
pub struct ProcMonitor {
    pid: u32,
    /// `(when, CPU seconds used by then)` at the previous sample.
    last: Option<(Instant, f64)>,
    clock_ticks_per_s: f64,
}

impl ProcMonitor {
    pub fn new(pid: u32) -> ProcMonitor {
        ProcMonitor { pid, last: None, clock_ticks_per_s: clock_ticks_per_second() }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Reads the process now; the error is the reason to show instead of numbers.
    pub fn sample(&mut self, now: Instant) -> Result<ProcStats, String> {
        if !cfg!(target_os = "linux") {
            return Err("reads /proc, which only Linux has".into());
        }
        let dir = PathBuf::from(format!("/proc/{}", self.pid));
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).map_err(|e| format!("pid {}: {e}", self.pid));
        let ticks = parse_stat_cpu_ticks(&read("stat")?).ok_or("cannot parse /proc/PID/stat")?;
        let rss_bytes = parse_status_rss_bytes(&read("status")?).ok_or("no VmRSS in /proc/PID/status")?;
        let cpu_seconds = ticks as f64 / self.clock_ticks_per_s;
        let cpu_percent = self.last.and_then(|(then, used)| {
            let dt = now.duration_since(then).as_secs_f64();
            // A counter that went back is another process with the same pid: start over.
            (dt > 0.0 && cpu_seconds >= used).then(|| 100.0 * (cpu_seconds - used) / dt)
        });
        self.last = Some((now, cpu_seconds));
        Ok(ProcStats { cpu_percent, rss_bytes })
    }
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    // USER_HZ has been 100 on every Linux architecture for decades (proc(5)).
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// `utime + stime` in clock ticks from the text of `/proc/PID/stat`. The command name (field
/// 2) is in parentheses and may itself contain spaces and parentheses, so fields are
/// counted from the last `)`.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of proc(5) (utime, stime); `after_name` starts at field 3.
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    Some(utime + stime)
}

/// `VmRSS` of `/proc/PID/status`, in bytes.
pub fn parse_status_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line["VmRSS:".len()..].trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

/// A power reading.
#[derive(Clone, Debug, PartialEq)]
pub enum Power {
    /// Average watts over the last interval; `ane` where the source reports the ANE apart.
    Watts { total: f64, ane: Option<f64> },
    /// The meter works but needs a second sample for a rate.
    Measuring,
    /// Why there is no number.
    Unavailable(String),
}

/// The package-0 energy counter of Linux's RAPL interface, in microjoules.
pub const RAPL_DIR: &str = "/sys/class/powercap/intel-rapl:0";

/// Power of the machine, from whatever this OS offers.
pub struct PowerMeter {
    source: Source,
    /// What is measured, for the label ("CPU package 0 (RAPL)").
    pub what: &'static str,
}

enum Source {
    Rapl { dir: PathBuf, max_uj: Option<u64>, last: Option<(Instant, u64)> },
    Powermetrics { samples: Receiver<(f64, Option<f64>)>, child: Child, latest: Option<(f64, Option<f64>)> },
    Unavailable(String),
}

impl PowerMeter {
    /// RAPL on Linux, `powermetrics` on macOS when running as root, else unavailable.
    pub fn detect() -> PowerMeter {
        if cfg!(target_os = "linux") {
            PowerMeter::rapl_at(Path::new(RAPL_DIR))
        } else if cfg!(target_os = "macos") {
            PowerMeter::powermetrics()
        } else {
            PowerMeter::unavailable("no power meter is known for this OS")
        }
    }

    pub fn unavailable(reason: impl Into<String>) -> PowerMeter {
        PowerMeter { source: Source::Unavailable(reason.into()), what: "power" }
    }

    /// RAPL through a powercap directory holding `energy_uj` (and `max_energy_range_uj`).
    pub fn rapl_at(dir: &Path) -> PowerMeter {
        let energy = dir.join("energy_uj");
        if let Err(e) = std::fs::read_to_string(&energy) {
            let reason = match e.kind() {
                std::io::ErrorKind::NotFound => format!("no RAPL here ({} absent)", energy.display()),
                // Since 2020 kernels restrict the counter to root (CVE-2020-8694, PLATYPUS).
                std::io::ErrorKind::PermissionDenied => format!("{} is readable by root only", energy.display()),
                _ => format!("{}: {e}", energy.display()),
            };
            return PowerMeter::unavailable(reason);
        }
        let max_uj = read_u64(&dir.join("max_energy_range_uj")).ok();
        PowerMeter { source: Source::Rapl { dir: dir.to_path_buf(), max_uj, last: None }, what: "CPU package 0 (RAPL)" }
    }

    fn powermetrics() -> PowerMeter {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return PowerMeter::unavailable("powermetrics needs root: run the dashboard with sudo");
        }
        let spawned = Command::new("powermetrics")
            .args(["--samplers", "cpu_power", "-i", "1000"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => return PowerMeter::unavailable(format!("cannot run powermetrics: {e}")),
        };
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, samples) = mpsc::channel();
        std::thread::spawn(move || {
            let mut block = String::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                block.push_str(&line);
                block.push('\n');
                // "Combined Power" closes the cpu_power sampler's block.
                if line.starts_with("Combined Power") {
                    if let Some(sample) = parse_powermetrics(&block) {
                        if tx.send(sample).is_err() {
                            return;
                        }
                    }
                    block.clear();
                }
            }
        });
        PowerMeter { source: Source::Powermetrics { samples, child, latest: None }, what: "CPU+GPU+ANE (powermetrics)" }
    }

    pub fn read(&mut self, now: Instant) -> Power {
        match &mut self.source {
            Source::Unavailable(reason) => Power::Unavailable(reason.clone()),
            Source::Rapl { dir, max_uj, last } => {
                let energy = match read_u64(&dir.join("energy_uj")) {
                    Ok(e) => e,
                    Err(e) => return Power::Unavailable(e),
                };
                let previous = last.replace((now, energy));
                match previous {
                    Some((then, e0)) => {
                        let dt = now.duration_since(then).as_secs_f64();
                        match rapl_watts(e0, energy, dt, *max_uj) {
                            Some(w) => Power::Watts { total: w, ane: None },
                            None => Power::Measuring,
                        }
                    }
                    None => Power::Measuring,
                }
            }
            Source::Powermetrics { samples, latest, .. } => {
                while let Ok(sample) = samples.try_recv() {
                    *latest = Some(sample);
                }
                match latest {
                    Some((total, ane)) => Power::Watts { total: *total, ane: *ane },
                    None => Power::Measuring,
                }
            }
        }
    }
}

impl Drop for PowerMeter {
    fn drop(&mut self) {
        if let Source::Powermetrics { child, .. } = &mut self.source {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn read_u64(path: &Path) -> Result<u64, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.trim().parse().map_err(|e| format!("{}: {e}", path.display()))
}

/// Watts from two readings of a RAPL energy counter (µJ) `dt` seconds apart. The counter
/// wraps at `max_energy_range_uj`; without that bound a decrease cannot be interpreted.
pub fn rapl_watts(e0: u64, e1: u64, dt: f64, max_uj: Option<u64>) -> Option<f64> {
    if dt <= 0.0 {
        return None;
    }
    let joules_e6 = if e1 >= e0 { e1 - e0 } else { max_uj?.checked_sub(e0)? + e1 };
    Some(joules_e6 as f64 / 1e6 / dt)
}

/// `(total W, ANE W)` from one sample of `powermetrics --samplers cpu_power`: the
/// "Combined Power" line when present, else the sum of the CPU, GPU and ANE lines.
pub fn parse_powermetrics(text: &str) -> Option<(f64, Option<f64>)> {
    let milliwatts = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.trim().strip_prefix(':').unwrap_or(rest).trim().strip_suffix("mW"))
            .and_then(|n| n.trim().parse::<f64>().ok())
    };
    let ane = milliwatts("ANE Power").map(|mw| mw / 1e3);
    let combined = milliwatts("Combined Power (CPU + GPU + ANE)").or_else(|| {
        let parts = [milliwatts("CPU Power"), milliwatts("GPU Power"), milliwatts("ANE Power")];
        parts.iter().any(Option::is_some).then(|| parts.iter().flatten().sum())
    })?;
    Some((combined / 1e3, ane))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // A command name with spaces and a parenthesis, as proc(5) warns.
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 75 0 0 20 0 3 0 100 1000000 500";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(325));
        assert_eq!(parse_stat_cpu_ticks("4242 (x) S 1"), None);
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn rss_comes_from_vmrss() {
        let status = "Name:\tanetrain\nVmPeak:\t  9000 kB\nVmRSS:\t    1968 kB\nThreads:\t3\n";
        assert_eq!(parse_status_rss_bytes(status), Some(1968 * 1024));
        assert_eq!(parse_status_rss_bytes("Name:\tkthreadd\n"), None);
    }

    #[test]
    fn this_process_is_measured_on_linux() {
        let mut monitor = ProcMonitor::new(std::process::id());
        let t0 = Instant::now();
        let result = monitor.sample(t0);
        if cfg!(target_os = "linux") {
            let first = result.unwrap();
            assert_eq!(first.cpu_percent, None, "a rate needs two samples");
            // A test binary is more than a megabyte and less than the machine.
            assert!(first.rss_bytes > 1 << 20 && first.rss_bytes < 1 << 40, "{first:?}");
            // Burn at least 10 clock ticks of CPU time; over a (synthetic) second that
            // is at least 10 % of a core.
            let ticks = || parse_stat_cpu_ticks(&std::fs::read_to_string("/proc/self/stat").unwrap()).unwrap();
            let start = ticks();
            let mut spin = 0u64;
            while ticks() < start + 10 {
                for i in 0..1_000_000u64 {
                    spin = std::hint::black_box(spin ^ i);
                }
            }
            let second = monitor.sample(t0 + Duration::from_secs(1)).unwrap();
            let percent = second.cpu_percent.unwrap();
            assert!(percent >= 10.0 * 100.0 / monitor.clock_ticks_per_s, "{percent}");
        } else {
            assert!(result.unwrap_err().contains("/proc"));
        }
        let mut gone = ProcMonitor::new(u32::MAX);
        assert!(gone.sample(t0).is_err());
    }

    #[test]
    fn rapl_rates_handle_the_counter_wrapping() {
        assert_eq!(rapl_watts(1_000_000, 3_000_000, 2.0, None), Some(1.0));
        // Wrapped at 10 J: 1 J before the wrap and 0.5 J after, in 0.5 s.
        assert_eq!(rapl_watts(9_000_000, 500_000, 0.5, Some(10_000_000)), Some(3.0));
        assert_eq!(rapl_watts(9_000_000, 500_000, 0.5, None), None);
        assert_eq!(rapl_watts(1, 2, 0.0, None), None);
    }

    #[test]
    fn a_rapl_directory_is_read_and_a_missing_one_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let missing = PowerMeter::rapl_at(&dir.path().join("intel-rapl:0")).read(Instant::now());
        let Power::Unavailable(reason) = missing else { panic!("{missing:?}") };
        assert!(reason.starts_with("no RAPL here"), "{reason}");

        std::fs::write(dir.path().join("energy_uj"), "5000000\n").unwrap();
        std::fs::write(dir.path().join("max_energy_range_uj"), "262143328850\n").unwrap();
        let mut meter = PowerMeter::rapl_at(dir.path());
        let t0 = Instant::now();
        assert_eq!(meter.read(t0), Power::Measuring);
        std::fs::write(dir.path().join("energy_uj"), "35000000\n").unwrap();
        // 30 J in 2 s.
        assert_eq!(meter.read(t0 + Duration::from_secs(2)), Power::Watts { total: 15.0, ane: None });
    }

    #[test]
    fn powermetrics_output_is_parsed() {
        let sample = "\
*** Sampled system activity (Wed Jan  1 12:00:00 2025 +0000) (1003.52ms elapsed) ***

**** Processor usage ****

CPU Power: 1840 mW
GPU Power: 25 mW
ANE Power: 410 mW
Combined Power (CPU + GPU + ANE): 2275 mW
";
        assert_eq!(parse_powermetrics(sample), Some((2.275, Some(0.41))));
        assert_eq!(parse_powermetrics("CPU Power: 1000 mW\nGPU Power: 500 mW\n"), Some((1.5, None)));
        assert_eq!(parse_powermetrics("nothing here"), None);
    }
}
