//! The compile budget: a process can compile only so many programs on the ANE before
//! compiles start failing (the compiler leaks state that only ends with the process).
//! anetrain counts compiles itself and refuses the one that would pass the budget, with
//! an error telling the caller to checkpoint and restart — rather than letting the ANE
//! fail first, possibly silently.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{Error, ErrorKind, Result};

/// Programs one process may compile. Reported publicly by the 2026 ANE training
/// experiments: "~119 compile limit — ANE compiler leaks resources" (the seed
/// repository's README), independently confirmed on M4 Max by the Orion paper
/// (constraint #5: "silent fail / crash" after ~119).
pub const DEFAULT_COMPILE_LIMIT: usize = 119;

/// A count of compiles. The process's own is [`PROCESS_COMPILES`]; tests make their own.
#[derive(Debug, Default)]
pub struct CompileCounter {
    done: AtomicUsize,
}

/// Every ANE compile in this process, whichever device instance asked for it: the limit
/// belongs to the process, not to a device.
pub static PROCESS_COMPILES: CompileCounter = CompileCounter::new();

impl CompileCounter {
    pub const fn new() -> CompileCounter {
        CompileCounter { done: AtomicUsize::new(0) }
    }

    /// Compiles counted so far (attempts, successful or not).
    pub fn done(&self) -> usize {
        self.done.load(Ordering::SeqCst)
    }

    /// Compiles still allowed under `limit`.
    pub fn left(&self, limit: usize) -> usize {
        limit.saturating_sub(self.done())
    }

    /// Counts one compile, or refuses it with [`ErrorKind::CompileBudget`] if it would
    /// pass `limit`. A compile that then fails still counts: the leak is reportedly per
    /// attempt. Returns the compile's ordinal (1 for the first).
    pub fn reserve(&self, limit: usize) -> Result<usize> {
        self.done
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < limit).then_some(n + 1))
            .map(|n| n + 1)
            .map_err(|n| {
                Error::new(
                    ErrorKind::CompileBudget,
                    format!(
                        "ANE compile budget spent: this process has compiled {n} programs and the budget is {limit} \
                         (the ANE reportedly fails after ~{DEFAULT_COMPILE_LIMIT} per process); checkpoint and \
                         restart the process to compile more"
                    ),
                )
            })
    }
}
