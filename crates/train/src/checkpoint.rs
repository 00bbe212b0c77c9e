//! Checkpoints: versioned, checksummed, written atomically.
//!
//! A checkpoint is a JSON document (config, step, RNG and data state, statistics — what
//! the trainer chooses) plus named f32 arrays (parameters, optimizer moments). On disk:
//!
//! ```text
//! "ANETCKPT"  u32 version  u64 json_len  json
//! u32 n_arrays  { u32 name_len  name  u64 len  len × f32 }…
//! sha256 of every byte before it (32 bytes)
//! ```
//! all little-endian. A file is written to a temporary name beside the target, synced,
//! then renamed over it (and the directory synced), so a crash at any moment leaves
//! either the old checkpoint or the new one, never a torn file.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// First bytes of every checkpoint file.
pub const MAGIC: &[u8; 8] = b"ANETCKPT";
/// The format version this code writes and reads.
pub const VERSION: u32 = 1;

/// Set to a byte count, the writer aborts the process after writing that many bytes of
/// the temporary file: the crash that tests (and users who doubt) can inject.
pub const FAIL_AFTER_ENV: &str = "ANETRAIN_CRASH_CHECKPOINT_AFTER_BYTES";

/// What can go wrong reading or writing a checkpoint; every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
}

fn format_err(path: &Path, message: impl Into<String>) -> CheckpointError {
    CheckpointError::Format { path: path.to_path_buf(), message: message.into() }
}

/// A checkpoint's content.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub meta: serde_json::Value,
    pub arrays: Vec<(String, Vec<f32>)>,
}

impl Checkpoint {
    /// The array with this name.
    pub fn array(&self, name: &str) -> Option<&[f32]> {
        self.arrays.iter().find(|(n, _)| n == name).map(|(_, a)| a.as_slice())
    }

    /// Takes the array with this name out of the checkpoint.
    pub fn take_array(&mut self, name: &str) -> Option<Vec<f32>> {
        let i = self.arrays.iter().position(|(n, _)| n == name)?;
        Some(self.arrays.swap_remove(i).1)
    }

    fn to_bytes(&self) -> Vec<u8> {
        let json = serde_json::to_vec(&self.meta).expect("JSON values always serialise");
        let payload: usize = self.arrays.iter().map(|(n, a)| 12 + n.len() + 4 * a.len()).sum();
        let mut out = Vec::with_capacity(8 + 4 + 8 + json.len() + 4 + payload + 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(&json);
        out.extend_from_slice(&(self.arrays.len() as u32).to_le_bytes());
        for (name, data) in &self.arrays {
            out.extend_from_slice(&(name.len() as u32).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&(data.len() as u64).to_le_bytes());
            for v in data {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        let digest = Sha256::digest(&out);
        out.extend_from_slice(&digest);
        out
    }

    /// Writes atomically: temporary file, fsync, rename, fsync of the directory.
    pub fn write_atomic(&self, path: &Path) -> Result<(), CheckpointError> {
        let io = |source| CheckpointError::Io { path: path.to_path_buf(), source };
        let bytes = self.to_bytes();
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(io)?;
        let file_name = path.file_name().ok_or_else(|| format_err(path, "a checkpoint path needs a file name"))?;
        let tmp = temp_path(dir, &file_name.to_string_lossy(), std::process::id());
        let result = (|| {
            let mut w = BufWriter::new(File::create(&tmp)?);
            match std::env::var(FAIL_AFTER_ENV).ok().and_then(|v| v.parse::<usize>().ok()) {
                Some(n) if n < bytes.len() => {
                    w.write_all(&bytes[..n])?;
                    w.flush()?;
                    eprintln!("{FAIL_AFTER_ENV}={n}: crashing in the middle of writing {}", path.display());
                    std::process::abort();
                }
                _ => w.write_all(&bytes)?,
            }
            let f = w.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
            fs::rename(&tmp, path)?;
            // The rename itself must reach the disk for the new file to survive a crash.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(io)
    }

    /// Reads only the metadata at the start of a checkpoint, without its arrays and
    /// without verifying the checksum (for a quick look; [`Checkpoint::read`] verifies).
    pub fn read_meta(path: &Path) -> Result<serde_json::Value, CheckpointError> {
        use std::io::Read;
        let io = |source| CheckpointError::Io { path: path.to_path_buf(), source };
        let mut file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut head = [0u8; 20];
        file.read_exact(&mut head).map_err(|_| format_err(path, format!("truncated: {len} bytes")))?;
        if &head[..8] != MAGIC {
            return Err(format_err(path, "not an anetrain checkpoint (it does not start with ANETCKPT)"));
        }
        let json_len = u64::from_le_bytes(head[12..20].try_into().unwrap());
        if json_len > len.saturating_sub(20) {
            return Err(format_err(path, "truncated: the metadata runs past the end of the file"));
        }
        let mut json = vec![0u8; json_len as usize];
        file.read_exact(&mut json).map_err(io)?;
        serde_json::from_slice(&json).map_err(|e| format_err(path, format!("bad metadata: {e}")))
    }

    /// Reads and verifies a checkpoint: magic, version, checksum, then structure.
    pub fn read(path: &Path) -> Result<Checkpoint, CheckpointError> {
        let io = |source| CheckpointError::Io { path: path.to_path_buf(), source };
        // The file is read whole, then its arrays copied out: twice its size.
        let len = fs::metadata(path).map_err(io)?.len();
        device::memory::check(&format!("{} ({} bytes)", path.display(), len), (len as usize).saturating_mul(2))
            .map_err(|e| format_err(path, format!("cannot be loaded: {e}")))?;
        let bytes = fs::read(path).map_err(io)?;
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return Err(format_err(path, "not an anetrain checkpoint (it does not start with ANETCKPT)"));
        }
        if bytes.len() < 8 + 4 + 32 {
            return Err(format_err(path, format!("truncated: {} bytes", bytes.len())));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
        if version != VERSION {
            return Err(format_err(path, format!("format version {version}; this anetrain reads version {VERSION}")));
        }
        let (body, digest) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(body).as_slice() != digest {
            return Err(format_err(path, "checksum mismatch: the file is corrupt or truncated"));
        }
        let mut r = Reader { bytes: body, at: 12, path };
        let json_len = r.u64()? as usize;
        let json = r.take(json_len)?;
        let meta = serde_json::from_slice(json).map_err(|e| format_err(path, format!("bad metadata: {e}")))?;
        let n = r.u32()? as usize;
        let mut arrays = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            let name_len = r.u32()? as usize;
            let name = String::from_utf8(r.take(name_len)?.to_vec())
                .map_err(|_| format_err(path, "an array name is not UTF-8"))?;
            let len = r.u64()? as usize;
            let raw = r.take(len.checked_mul(4).ok_or_else(|| format_err(path, "absurd array length"))?)?;
            arrays.push((name, raw.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()));
        }
        if r.at != body.len() {
            return Err(format_err(path, format!("{} unexpected bytes after the arrays", body.len() - r.at)));
        }
        Ok(Checkpoint { meta, arrays })
    }
}

/// The temporary file process `pid` writes `dir/name` through: `.name.tmp-pid`.
fn temp_path(dir: &Path, name: &str, pid: u32) -> PathBuf {
    dir.join(format!(".{name}.tmp-{pid}"))
}

/// The directory and file name of a checkpoint path.
fn dir_and_name(path: &Path) -> Result<(&Path, String), CheckpointError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| format_err(path, "a checkpoint path needs a file name"))?;
    Ok((dir, name.to_string_lossy().into_owned()))
}

/// Checks, before a run spends any time, that a checkpoint can be written to `path`:
/// it is not a directory, its folder exists or can be created, and a temporary file
/// can be created (and is removed again) beside it.
pub fn check_writable(path: &Path) -> Result<(), CheckpointError> {
    if path.is_dir() {
        return Err(format_err(path, "is a directory; give a file path for the checkpoint (e.g. DIR/ckpt.bin)"));
    }
    let (dir, name) = dir_and_name(path)?;
    let io = |source| CheckpointError::Io { path: path.to_path_buf(), source };
    fs::create_dir_all(dir).map_err(io)?;
    let tmp = temp_path(dir, &name, std::process::id());
    File::create(&tmp).map_err(|e| CheckpointError::Io { path: tmp.clone(), source: e })?;
    fs::remove_file(&tmp).map_err(|e| CheckpointError::Io { path: tmp.clone(), source: e })?;
    Ok(())
}

/// Removes the temporary files beside `path` (`.NAME.tmp-PID`) that processes no longer
/// running left behind: a `kill -9` in the middle of a checkpoint write leaves one, as
/// large as the checkpoint. Files of running processes are left alone. Returns the files
/// removed.
pub fn remove_stale_temps(path: &Path) -> Vec<PathBuf> {
    let Ok((dir, name)) = dir_and_name(path) else { return Vec::new() };
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name.to_str().and_then(|f| f.strip_prefix(&prefix)).and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !process_alive(pid) && fs::remove_file(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed
}

/// True when a process with this id exists (`kill(pid, 0)`: no signal is sent; EPERM
/// means it exists but belongs to someone else).
#[cfg(unix)]
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Elsewhere, every process counts as running: stale files are left, never a live one's removed.
#[cfg(not(unix))]
fn process_alive(_pid: u32) -> bool {
    true
}

/// Bounds-checked little-endian reads.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CheckpointError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or_else(|| {
            format_err(
                self.path,
                format!("truncated: needs {n} bytes at offset {}, file body is {}", self.at, self.bytes.len()),
            )
        })?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, CheckpointError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, CheckpointError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            meta: serde_json::json!({"step": 12, "config": {"dim": 8}}),
            arrays: vec![("params".into(), vec![1.0, -2.5, f32::MIN_POSITIVE]), ("m".into(), vec![])],
        }
    }

    #[test]
    fn round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/ckpt.bin");
        sample().write_atomic(&path).unwrap();
        assert_eq!(Checkpoint::read(&path).unwrap(), sample());
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn detects_corruption_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.bin");
        sample().write_atomic(&path).unwrap();
        let mut bytes = fs::read(&path).unwrap();
        bytes[40] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let e = Checkpoint::read(&path).unwrap_err().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
        fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert!(Checkpoint::read(&path).unwrap_err().to_string().contains("checksum"));
        fs::write(&path, b"hello").unwrap();
        assert!(Checkpoint::read(&path).unwrap_err().to_string().contains("not an anetrain checkpoint"));
    }

    #[test]
    fn stale_temp_files_of_dead_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.bin");
        // A process that has exited: its id names no running process (until reused).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = temp_path(dir.path(), "ckpt.bin", dead);
        let own = temp_path(dir.path(), "ckpt.bin", std::process::id());
        let other = dir.path().join(".other.bin.tmp-1");
        for p in [&stale, &own, &other] {
            fs::write(p, b"partial").unwrap();
        }
        assert_eq!(remove_stale_temps(&path), vec![stale.clone()]);
        assert!(!stale.exists() && own.exists() && other.exists());
    }

    #[test]
    fn unwritable_paths_are_found_before_training() {
        let dir = tempfile::tempdir().unwrap();
        let e = check_writable(dir.path()).unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
        let path = dir.path().join("sub/ckpt.bin");
        check_writable(&path).unwrap();
        // Nothing is left behind but the folder.
        assert_eq!(fs::read_dir(dir.path().join("sub")).unwrap().count(), 0);
    }
}
