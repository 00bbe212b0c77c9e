//! Allocation sizes that come from user input, checked before anything is allocated.
//!
//! A size computed from a flag (`--batch`), a program (a matmul's output shape) or a
//! file header (a model's dimensions) can overflow `usize` or ask for more memory than
//! the machine has; Rust's allocator then aborts the process (exit 134, "memory
//! allocation of … bytes failed") or the kernel's OOM killer ends it. Every such size
//! goes through this module instead: [`bytes_of`] multiplies with overflow checks, and
//! [`check`] compares the total with the memory available now and refuses with a
//! message naming what asked (the flag, field or tensor), the bytes needed and the
//! bytes available. The CLI, the CPU device's planner and the model, checkpoint and
//! tokenizer loaders all use it.
//!
//! ```
//! use device::memory;
//! // A product that overflows is refused by name...
//! let e = memory::bytes_of("--batch", &[usize::MAX / 2, 4]).unwrap_err();
//! assert!(e.to_string().contains("--batch"));
//! // ...and so is one larger than the memory there is (400 TB here).
//! let n = memory::bytes_of("--batch", &[100_000_000, 256, 4096, 4]).unwrap();
//! let e = memory::check_with("--batch", n as u128, Some(24 << 30)).unwrap_err();
//! assert!(e.to_string().contains("available"));
//! assert!(memory::check("a small buffer", 1024).is_ok());
//! ```

use std::fmt;

/// A size that cannot be allocated: what asked for it, how much, and how much there is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocError {
    /// The flag, field or tensor the size comes from (`--batch`, `n_layers`, `%y`).
    pub what: String,
    /// Bytes asked for; `None` when the size overflows 64 bits.
    pub needed: Option<u128>,
    /// Bytes available when asked; `None` when this system does not say.
    pub available: Option<u64>,
}

impl fmt::Display for AllocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.needed, self.available) {
            (None, _) => write!(f, "{}: the size overflows (more than 2^64 bytes)", self.what),
            (Some(n), Some(a)) => {
                write!(f, "{}: needs {} of memory, {} available", self.what, human_bytes(n), human_bytes(a as u128))
            }
            (Some(n), None) => write!(f, "{}: needs {}, more than this process can address", self.what, human_bytes(n)),
        }
    }
}

impl std::error::Error for AllocError {}

/// `1234567890` → `"1234567890 bytes (1.15 GiB)"`: exact, and readable.
pub fn human_bytes(n: u128) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64;
    let mut unit = "";
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{n} bytes ({v:.2} {unit})")
}

/// The product of `factors` (element counts and an element size), or an error naming
/// `what` if it overflows `usize`.
pub fn bytes_of(what: &str, factors: &[usize]) -> Result<usize, AllocError> {
    factors.iter().try_fold(1usize, |acc, &f| acc.checked_mul(f)).ok_or_else(|| AllocError {
        what: what.to_string(),
        needed: None,
        available: available_bytes(),
    })
}

/// Bytes the system can give this process now, if it says: the smaller of Linux's
/// `MemAvailable` and the cgroup's remaining limit. `None` elsewhere (the check then
/// refuses only sizes no process can address).
pub fn available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| mem_available(&s));
    let cgroup = cgroup_remaining();
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `MemAvailable` of a /proc/meminfo text, in bytes. (Parsed by hand: one field of one
/// file does not warrant a system-information crate and its dependencies.)
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// cgroup v2: `memory.max − memory.current` of this process's group, when limited.
fn cgroup_remaining() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    // cgroup v2 has one line, `0::/path`.
    let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = std::path::Path::new("/sys/fs/cgroup").join(rel.trim_start_matches('/'));
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok().map(|s| s.trim().to_string());
    let max: u64 = read("memory.max")?.parse().ok()?; // "max" (no limit) does not parse
    let current: u64 = read("memory.current")?.parse().ok()?;
    Some(max.saturating_sub(current))
}

/// Refuses `bytes` (asked for by `what`) when it exceeds the memory available now, or
/// when it cannot be a Rust allocation at all (more than `isize::MAX`).
pub fn check(what: &str, bytes: usize) -> Result<(), AllocError> {
    check_with(what, bytes as u128, available_bytes())
}

/// [`check`] with a given amount of available memory (for tests).
pub fn check_with(what: &str, bytes: u128, available: Option<u64>) -> Result<(), AllocError> {
    let too_big = bytes > isize::MAX as u128 || available.is_some_and(|a| bytes > a as u128);
    if too_big {
        return Err(AllocError { what: what.to_string(), needed: Some(bytes), available });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_and_excess_are_refused_by_name() {
        let e = bytes_of("--batch", &[usize::MAX / 2, 3]).unwrap_err();
        assert_eq!(e.needed, None);
        assert!(e.to_string().starts_with("--batch: the size overflows"));
        let e = check_with("%y", 6_553_600_000_064, Some(8 << 30)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "%y: needs 6553600000064 bytes (5.96 TiB) of memory, 8589934592 bytes (8.00 GiB) available"
        );
        assert!(check_with("x", 1 << 20, Some(8 << 30)).is_ok());
        assert!(check_with("x", u64::MAX as u128, None).is_err());
    }

    #[test]
    fn mem_available_reads_the_kib_field() {
        let text = "MemTotal:       16384 kB\nMemFree:  1 kB\nMemAvailable:    2048 kB\n";
        assert_eq!(mem_available(text), Some(2048 * 1024));
        assert_eq!(mem_available("MemTotal: 5 kB\n"), None);
    }
}
