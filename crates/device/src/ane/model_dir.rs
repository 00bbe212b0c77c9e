//! The on-disk model directory the ANE compiler reads.
//!
//! The compiler does not compile from the in-memory descriptor alone: it reads
//! `<temporary directory>/<hexStringIdentifier>/model.mil` and the weight files under
//! `weights/`, where the identifier is the in-memory model's `hexStringIdentifier` (a
//! hash of the MIL text, weights and options). So the directory's name is not ours to
//! choose; what we control is that it is private (mode 0700, under the per-user
//! temporary directory), written completely or not at all, and removed when the last
//! kernel using it is dropped — also when compiling fails.
//!
//! Two kernels of the same program in one process have the same identifier, hence the
//! same directory: they share it (reference-counted in this process), and the last one
//! out removes it. A directory left by a crashed process is replaced.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use mil::blob::{Weights, MODEL_PATH};

use crate::{Error, ErrorKind, Result};

/// Directories held by live kernels in this process, with how many hold each.
fn live() -> &'static Mutex<HashMap<PathBuf, usize>> {
    static LIVE: OnceLock<Mutex<HashMap<PathBuf, usize>>> = OnceLock::new();
    LIVE.get_or_init(Mutex::default)
}

/// A model directory, removed when the last holder drops it.
#[derive(Debug)]
pub struct ModelDir {
    path: PathBuf,
}

impl ModelDir {
    /// Creates (or joins) `root/name` holding `model.mil` and every weight file, each at
    /// the path its `@model_path/…` key names.
    pub fn create(root: &Path, name: &str, mil_text: &str, weights: &Weights) -> Result<ModelDir> {
        check_name(name)?;
        // Check every weight path before touching the disk.
        let files: Vec<(PathBuf, &[u8])> =
            weights.files().map(|(key, bytes)| Ok((relative_weight_path(key)?, bytes))).collect::<Result<_>>()?;
        let path = root.join(name);
        let mut registry = live().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(holders) = registry.get_mut(&path) {
            // Same identifier, same content: share the directory.
            *holders += 1;
            return Ok(ModelDir { path });
        }
        if path.exists() {
            // Left by a process that died before cleaning up.
            fs::remove_dir_all(&path).map_err(|e| io_error("remove the stale model directory", &path, e))?;
        }
        create_private_dir(&path, false).map_err(|e| io_error("create the model directory", &path, e))?;
        registry.insert(path.clone(), 1);
        drop(registry);
        // From here on, dropping `dir` removes the directory: a failed write leaves nothing.
        let dir = ModelDir { path };
        dir.write_file(Path::new("model.mil"), mil_text.as_bytes())?;
        for (rel, bytes) in files {
            dir.write_file(&rel, bytes)?;
        }
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rewrites the weight files in place (for an unload → rewrite → load reload).
    pub fn rewrite_weights(&self, weights: &Weights) -> Result<()> {
        for (key, bytes) in weights.files() {
            self.write_file(&relative_weight_path(key)?, bytes)?;
        }
        Ok(())
    }

    /// Writes a file below the directory through a temporary name and a rename, so the
    /// compiler never reads a half-written file.
    fn write_file(&self, rel: &Path, bytes: &[u8]) -> Result<()> {
        let target = self.path.join(rel);
        if let Some(parent) = target.parent() {
            if !parent.exists() {
                create_private_dir(parent, true).map_err(|e| io_error("create", parent, e))?;
            }
        }
        let tmp = target.with_extension("partial");
        fs::write(&tmp, bytes).map_err(|e| io_error("write", &tmp, e))?;
        fs::rename(&tmp, &target).map_err(|e| io_error("rename into place", &target, e))
    }
}

impl Drop for ModelDir {
    fn drop(&mut self) {
        let mut registry = live().lock().unwrap_or_else(|e| e.into_inner());
        let last = match registry.get_mut(&self.path) {
            Some(holders) if *holders > 1 => {
                *holders -= 1;
                false
            }
            _ => {
                registry.remove(&self.path);
                true
            }
        };
        if last {
            // Nothing to do about a failure here but leave the directory behind; the next
            // process with the same program replaces it.
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Removes every model directory this process holds, for a process about to `exec()`
/// itself: the image is replaced without running destructors, so the kernels' directories
/// would stay in the temporary directory (one per compiled program, weights included).
/// No kernel of this process may compile or load after this; evaluating is unaffected
/// (the compiler reads the directory, not the evaluation).
pub fn remove_all_before_exec() {
    let mut registry = live().lock().unwrap_or_else(|e| e.into_inner());
    for (path, _) in registry.drain() {
        let _ = fs::remove_dir_all(&path);
    }
}

/// The directory name must be one path component: the framework's identifier is hex
/// (with separators); anything else would write outside the temporary directory.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::new(ErrorKind::Compile, format!("model identifier `{name}` is not a plain directory name")))
    }
}

/// `@model_path/weights/w.bin` → `weights/w.bin`, refusing anything that would land
/// outside the model directory.
pub fn relative_weight_path(key: &str) -> Result<PathBuf> {
    let bad = |why: &str| {
        Error::new(ErrorKind::Program, format!("weight file `{key}`: {why}; expected `{MODEL_PATH}weights/NAME.bin`"))
    };
    let rel = key.strip_prefix(MODEL_PATH).ok_or_else(|| bad("the path does not start with `@model_path/`"))?;
    let path = Path::new(rel);
    if rel.is_empty() || !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(bad("the path must stay inside the model directory (no `..` or leading `/`)"));
    }
    if rel == "model.mil" {
        return Err(bad("the name is taken by the program text"));
    }
    Ok(path.to_path_buf())
}

/// Creates a directory readable by its owner only (`recursive`: with its parents).
#[cfg(unix)]
fn create_private_dir(path: &Path, recursive: bool) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new().recursive(recursive).mode(0o700).create(path)
}

#[cfg(not(unix))]
fn create_private_dir(path: &Path, recursive: bool) -> io::Result<()> {
    fs::DirBuilder::new().recursive(recursive).create(path)
}

fn io_error(what: &str, path: &Path, e: io::Error) -> Error {
    Error::new(ErrorKind::Compile, format!("cannot {what} `{}`: {e}", path.display()))
}
