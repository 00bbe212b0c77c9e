//! An emulation of the private AppleNeuralEngine framework, and of the libobjc,
//! Foundation, CoreFoundation and IOSurface functions anetrain's ANE device calls, as
//! one shared library. With `ANETRAIN_ANE_FRAMEWORKS=/path/to/libane_emu.so`, the ANE
//! device (`device::ane`) loads this library instead of Apple's images, through the same
//! `dlopen`, `dlsym` and `objc_msgSend` code, so CI executes that code on Linux:
//!
//! ```sh
//! cargo build -p ane-emu
//! ANETRAIN_ANE_FRAMEWORKS=target/debug/libane_emu.so anetrain train --device ane --steps 20
//! ```
//!
//! What it checks, as the real runtime would make it crash or fail:
//! - `objc_msgSend` ([`objc`]) is an assembly trampoline that jumps to an `extern "C"`
//!   function with the exact prototype of the method, registers and stack untouched. A
//!   caller with a wrong prototype passes garbage; every pointer argument is checked
//!   against the table of live objects (with a tagged header), every count, length and
//!   QoS for plausibility, and an unknown selector or bad argument aborts with a message
//!   naming the selector and the argument.
//! - Retain counts: a message to a released object aborts ("use after release"), and at
//!   process exit any object or IOSurface still alive is reported and the process exits
//!   with status [`LEAK_EXIT_STATUS`].
//! - IOSurfaces ([`iosurface`]): writing while locked read-only aborts; evaluating with a
//!   bound surface still locked aborts.
//! - The ANE classes ([`ane`]): compile reads the model directory the caller wrote,
//!   parses and lints the program with the `mil` crate, and applies the rejections the
//!   real compiler is reported to make ([`Rule`], each switchable); evaluate runs the
//!   program on the CPU device in fp16-rounding mode, by the binding rule in force.
//!
//! What it cannot tell: whether Apple's compiler accepts a program, the ANE's numerics
//! (beyond fp16 rounding of every op) and its speed. docs/ANE.md says more.
//!
//! Settings, read once from the environment:
//! - `ANETRAIN_ANE_EMU_REJECT`: the rejections in force, comma-separated ([`Rule`]
//!   names), `none`, or `default` ([`DEFAULT_RULES`]);
//! - `ANETRAIN_ANE_EMU_BIND`: `alphabetical` (default) or `declaration`: the order in
//!   which the emulated ANE binds a request's surfaces to the program's inputs/outputs;
//! - `ANETRAIN_ANE_EMU_COMPILE_LIMIT`: compiles before the compiler fails (default 119,
//!   so compile 120 fails);
//! - `ANETRAIN_ANE_EMU_FAIL_LOADS`: the first N loads fail (to exercise the retry);
//! - `ANETRAIN_ANE_EMU_LOG`: a file the call log is appended to (compile, load,
//!   evaluate, unload, creation, release and deallocation of ANE objects and surfaces);
//! - `ANETRAIN_ANE_EMU_LEAKS=ignore`: no leak check at exit.

// The exported C functions keep their C names.
#![allow(non_snake_case)]

pub mod ane;
pub mod foundation;
pub mod iosurface;
pub mod objc;

use std::ffi::{c_char, c_void};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex, Once};

use objc::{arg, fail, state, Id, Sel};

/// The exit status of a process that ends with live objects.
pub const LEAK_EXIT_STATUS: i32 = 3;

/// A rejection the real ANE compiler or runtime is reported to make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// More than one input surface: status 0x1d at evaluate (the seed's README:
    /// "multi-input ANE requests cause 0x1d error").
    MultiInput,
    /// A tensor of rank other than 4: compile fails (every program of the seed is rank 4).
    Rank,
    /// An input or output whose spatial width is not a multiple of 16: compile fails
    /// (Orion: "pad the seq dim to >= 16").
    Width,
    /// A surface under 48 KiB: status 0x1d at evaluate (Orion #4).
    SmallSurface,
    /// Input (or output) surfaces of unequal sizes: status 0x1d at evaluate (Orion #2, #18).
    UnequalSizes,
    /// The compile budget: compile `limit + 1` fails (the seed's "~119 compile limit").
    Budget,
    /// `cast` is rejected, as on M1/M2 (the seed's PR #6).
    Cast,
}

impl Rule {
    pub const ALL: [Rule; 7] =
        [Rule::MultiInput, Rule::Rank, Rule::Width, Rule::SmallSurface, Rule::UnequalSizes, Rule::Budget, Rule::Cast];

    pub fn name(self) -> &'static str {
        match self {
            Rule::MultiInput => "multi-input",
            Rule::Rank => "rank",
            Rule::Width => "width",
            Rule::SmallSurface => "small-surface",
            Rule::UnequalSizes => "unequal-sizes",
            Rule::Budget => "budget",
            Rule::Cast => "cast",
        }
    }
}

/// The rejections in force unless `ANETRAIN_ANE_EMU_REJECT` says otherwise: every reported
/// rule the packed kernels (one input, one output, rank 4) meet. `width` is off: the
/// static pipeline's RMSNorm-backward extra returns `dx` and a width-1 `dgain` side by side
/// on the spatial axis; `cast` emulates an M1/M2.
pub const DEFAULT_RULES: [Rule; 5] =
    [Rule::MultiInput, Rule::Rank, Rule::SmallSurface, Rule::UnequalSizes, Rule::Budget];

pub const REJECT_ENV: &str = "ANETRAIN_ANE_EMU_REJECT";
pub const BIND_ENV: &str = "ANETRAIN_ANE_EMU_BIND";
pub const COMPILE_LIMIT_ENV: &str = "ANETRAIN_ANE_EMU_COMPILE_LIMIT";
pub const FAIL_LOADS_ENV: &str = "ANETRAIN_ANE_EMU_FAIL_LOADS";
pub const LOG_ENV: &str = "ANETRAIN_ANE_EMU_LOG";
pub const LEAKS_ENV: &str = "ANETRAIN_ANE_EMU_LEAKS";

/// The emulation's settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub rules: Vec<Rule>,
    pub alphabetical_binding: bool,
    pub compile_limit: usize,
    pub fail_loads: usize,
    pub log: Option<PathBuf>,
    pub check_leaks: bool,
}

impl Config {
    pub fn rejects(&self, rule: Rule) -> bool {
        self.rules.contains(&rule)
    }

    /// The settings from the environment; a bad value aborts, naming the variable.
    fn from_env() -> Config {
        let var = |name: &str| std::env::var(name).ok();
        let rules = match var(REJECT_ENV).as_deref().map(str::trim) {
            None | Some("default") => DEFAULT_RULES.to_vec(),
            Some("none") | Some("") => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|n| {
                    let n = n.trim();
                    Rule::ALL.into_iter().find(|r| r.name() == n).unwrap_or_else(|| {
                        let names: Vec<&str> = Rule::ALL.iter().map(|r| r.name()).collect();
                        fail(format!("{REJECT_ENV}: unknown rule `{n}`; known: {}, or none/default", names.join(", ")))
                    })
                })
                .collect(),
        };
        let alphabetical_binding = match var(BIND_ENV).as_deref() {
            None | Some("alphabetical") => true,
            Some("declaration") => false,
            Some(other) => fail(format!("{BIND_ENV}=`{other}`: expected `alphabetical` or `declaration`")),
        };
        let number = |name: &str, default: usize| match var(name) {
            None => default,
            Some(v) => v.trim().parse().unwrap_or_else(|_| fail(format!("{name}=`{v}`: expected a whole number"))),
        };
        Config {
            rules,
            alphabetical_binding,
            compile_limit: number(COMPILE_LIMIT_ENV, device::ane::budget::DEFAULT_COMPILE_LIMIT),
            fail_loads: number(FAIL_LOADS_ENV, 0),
            log: var(LOG_ENV).map(PathBuf::from),
            check_leaks: var(LEAKS_ENV).as_deref() != Some("ignore"),
        }
    }
}

static CONFIG: LazyLock<Config> = LazyLock::new(Config::from_env);

pub fn config() -> &'static Config {
    &CONFIG
}

static COMPILES: AtomicUsize = AtomicUsize::new(0);
static LOADS_FAILED: AtomicUsize = AtomicUsize::new(0);

/// Counts a compile attempt; returns its ordinal (1 for the first).
fn count_compile() -> usize {
    COMPILES.fetch_add(1, Ordering::SeqCst) + 1
}

/// Whether this load is one of the first `ANETRAIN_ANE_EMU_FAIL_LOADS`, made to fail.
fn take_injected_load_failure() -> bool {
    LOADS_FAILED
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < config().fail_loads).then_some(n + 1))
        .is_ok()
}

/// `NSTemporaryDirectory()`: the process's temporary directory (`TMPDIR` or `/tmp`).
pub fn temporary_directory() -> PathBuf {
    std::env::temp_dir()
}

static LOG: LazyLock<Mutex<Option<std::fs::File>>> = LazyLock::new(|| {
    Mutex::new(config().log.as_ref().map(|path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap_or_else(|e| fail(format!("{LOG_ENV}: cannot open {}: {e}", path.display())))
    }))
});

/// Appends one line to the call log, if there is one.
pub fn log_event(line: &str) {
    if config().log.is_none() {
        return;
    }
    if let Some(file) = LOG.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        // One write per line, so processes appending to one file do not interleave lines.
        let _ = file.write_all(format!("{} {line}\n", std::process::id()).as_bytes());
    }
}

/// Checks, when the process exits, that nothing is left alive.
extern "C" fn check_leaks_at_exit() {
    if !config().check_leaks {
        return;
    }
    let Ok(s) = objc::STATE.try_lock() else {
        eprintln!("ane-emu: the object table is busy at exit; leak check skipped");
        return;
    };
    let live = s.live_objects();
    if live.is_empty() {
        return;
    }
    let listed: Vec<String> = live
        .iter()
        .take(12)
        .map(|(class, serial, rc)| format!("{}#{serial} (retain count {rc})", class.name()))
        .collect();
    let more =
        if live.len() > listed.len() { format!(", and {} more", live.len() - listed.len()) } else { String::new() };
    let message = format!("{} objects leaked at exit: {}{more}", live.len(), listed.join(", "));
    eprintln!("ane-emu: {message}");
    log_event(&format!("leak {message}"));
    // SAFETY: ends the process at once with the leak status; nothing runs after.
    unsafe { libc::_exit(LEAK_EXIT_STATUS) }
}

static INIT: Once = Once::new();

/// Registers the exit check on first use of the library.
fn init() {
    INIT.call_once(|| {
        // Read the settings now, so a bad value is reported at load, not mid-run.
        let _ = config();
        // SAFETY: registers a plain `extern "C" fn()` to run at exit.
        unsafe { libc::atexit(check_leaks_at_exit) };
    });
}

// --- the exported C functions -----------------------------------------------------------

/// `Class objc_getClass(const char *name)`: the class, or nil for one not emulated.
///
/// # Safety
/// `name` must be a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn objc_getClass(name: *const c_char) -> Id {
    init();
    objc::class_by_name(objc::c_str(name, &arg("objc_getClass", "name")))
}

/// `SEL sel_registerName(const char *str)`
///
/// # Safety
/// `name` must be a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn sel_registerName(name: *const c_char) -> Sel {
    init();
    objc::register_selector(objc::c_str(name, &arg("sel_registerName", "str")))
}

/// `void *objc_autoreleasePoolPush(void)`
#[no_mangle]
pub extern "C" fn objc_autoreleasePoolPush() -> *mut c_void {
    objc::pool_push()
}

/// `void objc_autoreleasePoolPop(void *context)`
#[no_mangle]
pub extern "C" fn objc_autoreleasePoolPop(token: *mut c_void) {
    objc::pool_pop(token)
}

/// `void CFRelease(CFTypeRef cf)`: crashes on NULL, as CoreFoundation's does.
#[no_mangle]
pub extern "C" fn CFRelease(cf: *const c_void) {
    let what = arg("CFRelease", "cf");
    if cf.is_null() {
        fail(format!("{what}: NULL (CFRelease(NULL) crashes)"));
    }
    let mut s = state();
    let o = s.live(cf.cast_mut(), &what);
    log_event(&format!("CFRelease {}#{}", o.class.name(), o.serial));
    s.release(cf.cast_mut(), &what);
}

/// `NSString *NSTemporaryDirectory(void)`: autoreleased, with a trailing `/` as Foundation's.
#[no_mangle]
pub extern "C" fn NSTemporaryDirectory() -> Id {
    let mut dir = temporary_directory().to_string_lossy().into_owned();
    if !dir.ends_with('/') {
        dir.push('/');
    }
    foundation::new_string(&dir)
}

/// For tests: how many objects (IOSurfaces included) are alive.
#[no_mangle]
pub extern "C" fn ane_emu_live_objects() -> usize {
    state().live_objects().len()
}

/// For tests: how many compiles this process attempted.
#[no_mangle]
pub extern "C" fn ane_emu_compiles() -> usize {
    COMPILES.load(Ordering::SeqCst)
}
