//! One error type for the crate: what went wrong, and in which file.
//!
//! Messages are written for the person who typed the command: they name the file, the
//! field and both sides of a disagreement ("header says …, file has …").

use std::fmt;
use std::path::{Path, PathBuf};

/// What kind of mistake an [`Error`] reports. Tests match on this, users read the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Reading or writing a file failed at the operating-system level.
    Io,
    /// A file is malformed: truncated, wrong size, bad magic, bad header field, bad UTF-8.
    Format,
    /// A model configuration is inconsistent or out of bounds (names the field).
    Config,
    /// Two things that must agree do not (tokenizer vs. model vocabulary, buffer sizes).
    Mismatch,
    /// A bad argument: a token id outside the vocabulary, a position past `seq_len`,
    /// a negative temperature.
    Input,
    /// Something valid that this crate cannot represent (e.g. QKV biases in llama2.c files).
    Unsupported,
}

/// An error with the context a user needs to find and fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
    /// The file involved, when there is one; printed before the message.
    pub file: Option<PathBuf>,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error { kind, message: message.into(), file: None }
    }

    /// Attaches a file name unless one is already attached (the innermost file wins).
    pub fn in_file(mut self, file: impl AsRef<Path>) -> Error {
        if self.file.is_none() {
            self.file = Some(file.as_ref().to_path_buf());
        }
        self
    }

    pub(crate) fn io(file: &Path, what: &str, err: std::io::Error) -> Error {
        Error::new(ErrorKind::Io, format!("{what}: {err}")).in_file(file)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shorthand for building an error of a kind with a formatted message.
macro_rules! err {
    ($kind:ident, $($fmt:tt)*) => {
        $crate::error::Error::new($crate::error::ErrorKind::$kind, format!($($fmt)*))
    };
}
pub(crate) use err;

/// `1056540` → `"1,056,540"`: byte counts in messages are easier to compare with commas.
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(60_816_028), "60,816,028");
        assert_eq!(thousands(1_056_540), "1,056,540");
    }

    #[test]
    fn display_puts_the_file_first() {
        let e = err!(Format, "header says dim {}", 288).in_file("model.bin").in_file("other.bin");
        assert_eq!(e.to_string(), "model.bin: header says dim 288");
        assert_eq!(e.kind, ErrorKind::Format);
    }
}
