//! Downloading a dataset archive over HTTPS, resumably, and unpacking it.
//!
//! The file grows as `NAME.part` beside its destination. A run that finds a `.part`
//! asks the server for the rest with an HTTP `Range: bytes=N-` request and appends;
//! a server that ignores the range (200 instead of 206) gets the download restarted
//! from zero. Only when every byte the server announced has arrived — and, when a
//! digest is known, its sha256 matches — is the `.part` renamed to `NAME`, so a file
//! under the final name is always complete. A network failure leaves the `.part` for
//! the next run and says so. A `.part` whose digest is wrong cannot be saved by
//! resuming: it is deleted, and the error says to run again.
//!
//! Unpacking a `.tar.gz` goes to `DIR.partial` first and is renamed to `DIR` at the
//! end, for the same reason. The `tar` crate refuses entries that would land outside
//! the folder (`..`, absolute paths).
//!
//! HTTPS uses `ureq` with rustls (no system OpenSSL); plain `http://` works too, which
//! the tests use against a server on 127.0.0.1.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::ProgressBar;
use sha2::{Digest, Sha256};

/// The TinyStories archive (all 50 JSON shards, ≈1.5 GB) on the Hugging Face Hub, as
/// llama2.c's `tinystories.py download` fetches it.
pub const TINYSTORIES_URL: &str =
    "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz";

/// How long to wait for a connection, and for the next bytes of a response.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes copied per read while downloading.
const CHUNK: usize = 1 << 16;

/// What can go wrong downloading or unpacking.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DownloadError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("--sha256 {0:?} is not a sha256 digest (64 hexadecimal digits)")]
    BadDigest(String),
    #[error(
        "downloading {url} failed after {have} bytes{}: {message}. {}",
        total.map_or(String::new(), |t| format!(" of {t}")),
        if *have > 0 {
            format!("The partial file {} is kept; run the same command again to resume", part.display())
        } else {
            "Nothing was written; check the URL and the network, then run the command again".to_string()
        }
    )]
    Interrupted { url: String, part: PathBuf, have: u64, total: Option<u64>, message: String },
    #[error("{url}: the server answered HTTP {status}{}", if message.is_empty() { String::new() } else { format!(" ({message})") })]
    Http { url: String, status: u16, message: String },
    #[error(
        "{}: sha256 is {actual}, expected {expected}; the file is corrupt or not the one expected \
         and was deleted — run again to download it afresh",
        path.display()
    )]
    Checksum { path: PathBuf, expected: String, actual: String },
    #[error("{}: sha256 is {actual}, expected {expected}; remove the file to download it again", path.display())]
    ChecksumExisting { path: PathBuf, expected: String, actual: String },
    #[error("{}: cannot unpack: {message}", path.display())]
    Unpack { path: PathBuf, message: String },
}

/// The result of [`fetch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    pub path: PathBuf,
    pub bytes: u64,
    /// Lowercase hex.
    pub sha256: String,
    /// Bytes that were already in the `.part` file when this run started.
    pub resumed_from: u64,
    /// The file was complete before this run; nothing was downloaded.
    pub already_complete: bool,
}

/// `NAME.part`, where the download of `dest` grows.
pub fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

/// The sha256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String, DownloadError> {
    let io_error = |source| DownloadError::Io { path: path.to_path_buf(), source };
    let mut file = File::open(path).map_err(io_error)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(io_error)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks and normalizes (lowercases) a digest given by the user.
fn parse_digest(digest: &str) -> Result<String, DownloadError> {
    let d = digest.trim().to_ascii_lowercase();
    if d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(DownloadError::BadDigest(digest.to_string()));
    }
    Ok(d)
}

/// Downloads `url` to `dest`, resuming a `dest.part` left by an earlier run (see the
/// module docs). `progress` shows bytes; its length is set once the size is known.
/// When `sha256` is given the file must match it, also when `dest` already exists.
pub fn fetch(url: &str, dest: &Path, sha256: Option<&str>, progress: &ProgressBar) -> Result<Fetched, DownloadError> {
    let expected = sha256.map(parse_digest).transpose()?;
    if dest.is_file() {
        let actual = sha256_file(dest)?;
        if let Some(expected) = expected.filter(|e| *e != actual) {
            // A complete file is the user's: it is reported, never deleted.
            return Err(DownloadError::ChecksumExisting { path: dest.into(), expected, actual });
        }
        let bytes = std::fs::metadata(dest).map_err(|source| DownloadError::Io { path: dest.into(), source })?.len();
        return Ok(Fetched { path: dest.into(), bytes, sha256: actual, resumed_from: bytes, already_complete: true });
    }
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| DownloadError::Io { path: dir.into(), source })?;
    }
    let part = part_path(dest);
    let resumed_from = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    let agent = ureq::AgentBuilder::new().timeout_connect(CONNECT_TIMEOUT).timeout_read(READ_TIMEOUT).build();
    let total = transfer(&agent, url, &part, resumed_from, progress)?;

    let have = std::fs::metadata(&part).map_err(|source| DownloadError::Io { path: part.clone(), source })?.len();
    if let Some(total) = total {
        if have != total {
            return Err(DownloadError::Interrupted {
                url: url.into(),
                part,
                have,
                total: Some(total),
                message: "the connection closed early".into(),
            });
        }
    }
    let actual = sha256_file(&part)?;
    if let Some(expected) = expected {
        if actual != expected {
            let _ = std::fs::remove_file(&part);
            return Err(DownloadError::Checksum { path: part, expected, actual });
        }
    }
    std::fs::rename(&part, dest).map_err(|source| DownloadError::Io { path: dest.into(), source })?;
    Ok(Fetched { path: dest.into(), bytes: have, sha256: actual, resumed_from, already_complete: false })
}

/// One HTTP exchange appending to `part` from byte `offset`. Returns the total size the
/// server announced, if it did.
fn transfer(
    agent: &ureq::Agent,
    url: &str,
    part: &Path,
    offset: u64,
    progress: &ProgressBar,
) -> Result<Option<u64>, DownloadError> {
    let interrupted = |have: u64, total: Option<u64>, message: String| DownloadError::Interrupted {
        url: url.into(),
        part: part.into(),
        have,
        total,
        message,
    };
    let mut request = agent.get(url);
    if offset > 0 {
        request = request.set("Range", &format!("bytes={offset}-"));
    }
    let response = match request.call() {
        Ok(response) => response,
        // Asked for the bytes after a complete file: nothing is left to fetch.
        Err(ureq::Error::Status(416, response)) if offset > 0 => {
            let total = response.header("Content-Range").and_then(|r| r.rsplit('/').next()?.parse::<u64>().ok());
            if total == Some(offset) {
                return Ok(total);
            }
            // The partial file does not fit what the server has: start over.
            std::fs::remove_file(part).map_err(|source| DownloadError::Io { path: part.into(), source })?;
            return transfer(agent, url, part, 0, progress);
        }
        Err(ureq::Error::Status(status, response)) => {
            let message = response.status_text().to_string();
            return Err(DownloadError::Http { url: url.into(), status, message });
        }
        Err(ureq::Error::Transport(t)) => return Err(interrupted(offset, None, t.to_string())),
    };
    let length: Option<u64> = response.header("Content-Length").and_then(|l| l.parse().ok());
    let (start, mut file) = match response.status() {
        206 => {
            // "bytes START-END/TOTAL": the server must resume where we asked.
            let range = response.header("Content-Range").unwrap_or("");
            let start = range.strip_prefix("bytes ").and_then(|r| r.split('-').next()?.parse::<u64>().ok());
            if start != Some(offset) {
                return Err(DownloadError::Http {
                    url: url.into(),
                    status: 206,
                    message: format!("asked for bytes from {offset}, got Content-Range {range:?}"),
                });
            }
            let file = OpenOptions::new().append(true).open(part);
            (offset, file.map_err(|source| DownloadError::Io { path: part.into(), source })?)
        }
        _ => {
            // 200: the whole file (a server that ignores Range restarts us from zero).
            (0, File::create(part).map_err(|source| DownloadError::Io { path: part.into(), source })?)
        }
    };
    let total = length.map(|l| start + l);
    if let Some(total) = total {
        progress.set_length(total);
    }
    progress.set_position(start);
    let mut reader = response.into_reader();
    let mut buffer = vec![0u8; CHUNK];
    let mut have = start;
    loop {
        let n = match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                file.flush().map_err(|source| DownloadError::Io { path: part.into(), source })?;
                return Err(interrupted(have, total, e.to_string()));
            }
        };
        file.write_all(&buffer[..n]).map_err(|source| DownloadError::Io { path: part.into(), source })?;
        have += n as u64;
        progress.set_position(have);
    }
    file.flush().map_err(|source| DownloadError::Io { path: part.into(), source })?;
    Ok(total)
}

/// Unpacks a `.tar.gz` into `dir` (via `dir.partial`, renamed when done). Does nothing
/// when `dir` exists already. Returns the number of files unpacked. `progress` counts
/// entries.
pub fn unpack_tar_gz(archive: &Path, dir: &Path, progress: &ProgressBar) -> Result<usize, DownloadError> {
    if dir.is_dir() {
        return Ok(0);
    }
    let unpack_error = |message: String| DownloadError::Unpack { path: archive.into(), message };
    let mut partial = dir.as_os_str().to_os_string();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(|source| DownloadError::Io { path: partial.clone(), source })?;
    }
    std::fs::create_dir_all(&partial).map_err(|source| DownloadError::Io { path: partial.clone(), source })?;
    let file = File::open(archive).map_err(|source| DownloadError::Io { path: archive.into(), source })?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(io::BufReader::new(file)));
    let mut files = 0;
    for entry in tar.entries().map_err(|e| unpack_error(e.to_string()))? {
        let mut entry = entry.map_err(|e| unpack_error(e.to_string()))?;
        let name = entry.path().map(|p| p.display().to_string()).unwrap_or_default();
        let unpacked = entry.unpack_in(&partial).map_err(|e| unpack_error(format!("{name}: {e}")))?;
        if !unpacked {
            return Err(unpack_error(format!("entry {name} would land outside {}", dir.display())));
        }
        if entry.header().entry_type().is_file() {
            files += 1;
        }
        progress.inc(1);
    }
    std::fs::rename(&partial, dir).map_err(|source| DownloadError::Io { path: dir.into(), source })?;
    Ok(files)
}
