//! Turning what the framework reports (a NO return and an `NSError`, or a nil object)
//! into a [`crate::Error`] a user can act on: which step failed, for which program, the
//! framework's own words (the `NSError`'s `description`), and a hint where the words
//! match a publicly reported failure.

use std::fmt;

use mil::lint::Finding;

use crate::{Error, ErrorKind};

/// The step of the call sequence that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// `_ANEInMemoryModelDescriptor modelWithMILText:weights:optionsPlist:` gave nil.
    Descriptor,
    /// `_ANEInMemoryModel inMemoryModelWithDescriptor:` gave nil.
    Model,
    /// `compileWithQoS:options:error:`.
    Compile,
    /// `loadWithQoS:options:error:`.
    Load,
    /// IOSurfaces, their wrappers, or `_ANERequest` could not be made.
    Request,
    /// `evaluateWithQoS:options:request:error:`.
    Eval,
    /// `unloadWithQoS:error:`.
    Unload,
}

impl Step {
    fn kind(self) -> ErrorKind {
        match self {
            Step::Descriptor | Step::Model | Step::Compile | Step::Load | Step::Request => ErrorKind::Compile,
            Step::Eval | Step::Unload => ErrorKind::Eval,
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Descriptor => "describing",
            Step::Model => "creating the in-memory model of",
            Step::Compile => "compiling",
            Step::Load => "loading",
            Step::Request => "building the request for",
            Step::Eval => "evaluating",
            Step::Unload => "unloading",
        })
    }
}

/// Phrases in framework errors, and what publicly reported cause they point to.
const HINTS: &[(&str, &str)] = &[
    (
        "0x1d",
        "status 0x1d is reported for surfaces that are too small (under ~48 KiB), of unequal sizes, or bound in the \
         wrong order; see docs/ANE.md",
    ),
    (
        "InvalidMILProgram",
        "the ANE compiler rejects some valid MIL (concat, gelu, rsqrt, cast on M1/M2 are reported); see the lint \
         findings and docs/ANE.md",
    ),
    (
        "ANECCompile() FAILED",
        "the ANE compiler rejects some valid MIL (concat, gelu, rsqrt, cast on M1/M2 are reported), and fails \
         after ~119 compiles per process; see the lint findings and docs/ANE.md",
    ),
];

/// The error for a failed `step` on program `program` (its function name or a label).
/// `description` is the `NSError`'s description, if the framework gave one; `findings`
/// are the program's lint warnings, listed because a compile failure is most often one
/// of the reported limits.
pub fn framework_error(step: Step, program: &str, description: Option<&str>, findings: &[Finding]) -> Error {
    let said = match description.map(str::trim) {
        Some(d) if !d.is_empty() => d.to_string(),
        _ => "the framework gave no error description".to_string(),
    };
    let mut message = format!("ANE: {step} `{program}` failed: {said}");
    for (phrase, hint) in HINTS {
        if said.contains(phrase) {
            message.push_str(&format!("\n  hint: {hint}"));
        }
    }
    if matches!(step, Step::Compile | Step::Load) && !findings.is_empty() {
        message.push_str("\n  the lint's findings for this program:");
        for f in findings {
            message.push_str(&format!("\n    {f}"));
        }
    }
    Error::new(step.kind(), message)
}
