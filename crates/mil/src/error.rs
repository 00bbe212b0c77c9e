//! One error type for the whole crate: what went wrong, where (line:column, op, file),
//! and what was expected against what was found.

use std::fmt;
use std::path::PathBuf;

use crate::ir::Span;

/// What kind of mistake an [`Error`] reports. Tests match on this, users read the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The text does not follow MIL's grammar (includes truncated input).
    Syntax,
    /// A literal that cannot be read as its declared type (`int32(1.5)`, 3 values for `[4]`).
    BadLiteral,
    /// An op type this crate does not know.
    UnknownOp,
    /// A name used before (or without) being defined.
    UndefinedName,
    /// A name defined twice.
    DuplicateName,
    /// A dtype that differs from what the op requires or declares.
    TypeMismatch,
    /// A shape that differs from what the op requires or declares.
    ShapeMismatch,
    /// A missing, unknown, repeated or ill-valued op argument.
    BadArgument,
    /// A weight file that is missing, malformed, or too short for what is asked of it.
    Blob,
    /// An I/O failure reading or writing a file.
    Io,
}

/// A MIL error with the context a user needs to find and fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
    /// Where in the MIL text, when the error comes from text.
    pub span: Option<Span>,
    /// The op's name (its `name = string(...)` or first output), when an op is at fault.
    pub op: Option<String>,
    /// The file involved (a model.mil, a weight file), when there is one.
    pub file: Option<PathBuf>,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error { kind, message: message.into(), span: None, op: None, file: None }
    }

    pub fn at(mut self, span: Span) -> Error {
        if self.span.is_none() && span.line > 0 {
            self.span = Some(span);
        }
        self
    }

    pub fn in_op(mut self, op: impl Into<String>) -> Error {
        if self.op.is_none() {
            self.op = Some(op.into());
        }
        self
    }

    pub fn in_file(mut self, file: impl Into<PathBuf>) -> Error {
        if self.file.is_none() {
            self.file = Some(file.into());
        }
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}", file.display())?;
            if let Some(span) = self.span {
                write!(f, ":{}:{}", span.line, span.col)?;
            }
            write!(f, ": ")?;
        } else if let Some(span) = self.span {
            write!(f, "{}:{}: ", span.line, span.col)?;
        }
        if let Some(op) = &self.op {
            write!(f, "op `{op}`: ")?;
        }
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shorthand for building an error of a kind with a formatted message.
#[macro_export]
macro_rules! mil_err {
    ($kind:ident, $($fmt:tt)*) => {
        $crate::Error::new($crate::ErrorKind::$kind, format!($($fmt)*))
    };
}
