//! The ANE device's real FFI code (`device::ane`) against the emulated frameworks: the
//! library this package builds is loaded through `ANETRAIN_ANE_FRAMEWORKS`, exactly as
//! `Runtime::load` loads Apple's images.
//!
//! Tests that expect the emulation to abort, or need other emulation settings, run in a
//! child process (this test binary again, with `ANE_EMU_TEST_CHILD` set) and assert on
//! its exit status and stderr. The rest run in this process, one at a time, and the
//! emulation's exit check makes the whole binary fail if any of them leaks an object.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard, Once};

use device::ane::runtime::{Id, Runtime, Sel};
use device::ane::{ns, AneConfig, AneDevice, AneKernel};
use device::cpu::CpuDevice;
use device::{Device, Precision, Surface, Weights};
use mil::builder::FunctionBuilder;
use mil::{DType, Dialect, Program, TensorType};

/// The emulation library Cargo built for this test (as a dev-dependency of itself, the
/// package's cdylib sits next to this binary in `deps/`, and one level up once uplifted).
fn library() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let name = format!("{}ane_emu{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
    let deps = exe.parent().unwrap();
    [deps.join(&name), deps.parent().unwrap().join(&name)]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{name} is not built next to {}", exe.display()))
}

const CHILD_ENV: &str = "ANE_EMU_TEST_CHILD";

fn in_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// Points the ANE device at the emulation and logs its calls; once per process, before
/// any thread opens the device.
fn setup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::env::set_var(device::ane::runtime::FRAMEWORKS_ENV, library());
        // These tests bind several surfaces on purpose (binding order, teardown of each):
        // the default rules, which reject multi-input requests, less that one.
        if std::env::var_os(ane_emu::REJECT_ENV).is_none() {
            std::env::set_var(ane_emu::REJECT_ENV, "rank,small-surface,unequal-sizes,budget");
        }
        if std::env::var_os(ane_emu::LOG_ENV).is_none() {
            let log = std::env::temp_dir().join(format!("ane-emu-test-{}.log", std::process::id()));
            std::env::set_var(ane_emu::LOG_ENV, log);
        }
    });
}

/// In-process tests run one at a time: they share the emulation's object table.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    setup();
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs test `name` of this binary in a child process with `env` added.
fn run_child(name: &str, env: &[(&str, &str)]) -> Output {
    let log = tempfile::NamedTempFile::new().unwrap();
    // Its own temporary directory: model directories are named by the program's hash, so
    // a child compiling the program this process compiles would share (and remove) ours.
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", name, "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, "1")
        .env("TMPDIR", tmp.path())
        .env(device::ane::runtime::FRAMEWORKS_ENV, library())
        .env(ane_emu::LOG_ENV, log.path());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn aborted_with(out: &Output, needles: &[&str]) {
    let err = stderr(out);
    assert!(!out.status.success(), "the child should have been stopped:\n{err}");
    for n in needles {
        assert!(err.contains(n), "stderr does not mention `{n}`:\n{err}");
    }
}

fn live_objects() -> usize {
    // SAFETY: the emulation exports this with this prototype; loading the library again
    // returns the handle the device already holds.
    unsafe {
        let lib = libloading::Library::new(library()).unwrap();
        let f = lib.get::<unsafe extern "C" fn() -> usize>(b"ane_emu_live_objects\0").unwrap();
        f()
    }
}

fn open(perf_stats_mask: Option<u32>) -> AneDevice {
    AneDevice::open_with(AneConfig { dialect: Some(Dialect::Ios18), perf_stats_mask, ..AneConfig::default() }).unwrap()
}

/// `y = conv(x, w) + bias` and `doubled = 2·x`, fp32 I/O with casts. Inputs and outputs
/// are declared out of alphabetical order, so a binding-order mistake swaps them.
fn program() -> (Program, Weights) {
    let (c, s) = (64, 32);
    let mut weights = Weights::new();
    let w: Vec<f32> = (0..c * c).map(|i| ((i * 7 % 23) as f32 - 11.0) / 16.0).collect();
    let blob = weights.add_tensor("w", &[c, c, 1, 1], &w);
    let mut b = FunctionBuilder::new("main", Dialect::Ios18);
    let x = b.input("x", TensorType::surface(DType::Fp32, c, s));
    let bias = b.input("bias", TensorType::surface(DType::Fp32, c, s));
    let x16 = b.cast("x16", &x, DType::Fp16);
    let bias16 = b.cast("bias16", &bias, DType::Fp16);
    let w = b.constant("w", blob);
    let conv = b.conv1x1("conv", &x16, &w);
    let sum = b.add("sum", &conv, &bias16);
    let y = b.cast("y", &sum, DType::Fp32);
    let doubled16 = b.scale("doubled16", &x16, 2.0);
    let doubled = b.cast("doubled", &doubled16, DType::Fp32);
    b.output(&y);
    b.output(&doubled);
    (Program::new(Dialect::Ios18, b.finish().unwrap()), weights)
}

fn inputs() -> (Surface, Surface) {
    let (c, s) = (64, 32);
    let x: Vec<f32> = (0..c * s).map(|i| ((i * 13 % 31) as f32 - 15.0) / 8.0).collect();
    let bias: Vec<f32> = (0..c * s).map(|i| (i % 5) as f32 - 2.0).collect();
    (Surface::from_f32(DType::Fp32, &[1, c, 1, s], &x), Surface::from_f32(DType::Fp32, &[1, c, 1, s], &bias))
}

fn eval(kernel: &mut dyn device::Kernel) -> Vec<Vec<f32>> {
    let (x, bias) = inputs();
    let mut y = Surface::zeros(DType::Fp32, &[1, 64, 1, 32]);
    let mut doubled = Surface::zeros(DType::Fp32, &[1, 64, 1, 32]);
    kernel.eval(&[&x, &bias], &mut [&mut y, &mut doubled]).unwrap();
    vec![y.to_f32(), doubled.to_f32()]
}

#[test]
fn a_kernel_computes_what_the_cpu_device_computes_in_fp16() {
    let _serial = serial();
    let (program, weights) = program();
    let ane = open(None);
    let mut kernel = ane.compile(&program, &weights).unwrap();
    let got = eval(kernel.as_mut());
    // The independent reference: the CPU device, in its fp16-rounding mode, bound directly.
    let cpu = CpuDevice::new(Precision::Fp16);
    let want = eval(cpu.compile(&program, &weights).unwrap().as_mut());
    assert_eq!(got, want);
    assert!(got[1].iter().zip(&inputs().0.to_f32()).all(|(d, x)| *d == 2.0 * x));
    // A second eval through the same request.
    assert_eq!(eval(kernel.as_mut()), want);
    drop(kernel);
    assert_eq!(live_objects(), 0, "every object and surface is released with the kernel");
}

#[test]
fn dialect_detection_runs_its_test_program() {
    let _serial = serial();
    let ane = AneDevice::open().unwrap();
    assert_eq!(ane.dialect(), Dialect::Ios18);
    assert!(ane.dialect_note().contains("detected"), "{}", ane.dialect_note());
    assert_eq!(live_objects(), 0);
}

/// The call log's lines for one model's teardown, as `verb Class#serial`.
fn log_lines() -> Vec<String> {
    let path = std::env::var_os(ane_emu::LOG_ENV).unwrap();
    let pid = std::process::id().to_string();
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix(&pid).map(|rest| rest.trim().to_string()))
        .collect()
}

#[test]
fn teardown_unloads_then_releases_the_request_then_the_surfaces() {
    let _serial = serial();
    let (program, weights) = program();
    let ane = open(None);
    let kernel: AneKernel = ane.compile_kernel(&program, &weights).unwrap();
    let before = log_lines().len();
    drop(kernel);
    let lines = log_lines()[before..].to_vec();
    let first = |prefix: &str| {
        lines.iter().position(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no `{prefix}` in {lines:#?}"))
    };
    let unload = first("send unloadWithQoS:error: _ANEInMemoryModel#");
    let request = first("release _ANERequest#");
    let surface = first("CFRelease IOSurface#");
    let model = first("release _ANEInMemoryModel#");
    assert!(unload < request, "unload before the request is released: {lines:#?}");
    assert!(request < surface, "the request before the surfaces: {lines:#?}");
    assert!(surface < model, "the surfaces before the model: {lines:#?}");
    // All four surfaces (two in, two out) are released by their owner, and deallocated.
    assert_eq!(lines.iter().filter(|l| l.starts_with("CFRelease IOSurface#")).count(), 4);
    assert_eq!(lines.iter().filter(|l| l.starts_with("dealloc IOSurface#")).count(), 4);
    assert!(!lines.iter().any(|l| l.starts_with("dealloc-while-loaded")), "{lines:#?}");
    assert_eq!(live_objects(), 0);
}

#[test]
fn timing_asked_for_passes_performance_stats_and_reads_the_hardware_time() {
    let _serial = serial();
    let (program, weights) = program();
    let mut timed = open(Some(1)).compile(&program, &weights).unwrap();
    eval(timed.as_mut());
    assert!(timed.last_hw_time_ns().is_some_and(|ns| ns > 0));
    let mut untimed = open(None).compile(&program, &weights).unwrap();
    eval(untimed.as_mut());
    assert_eq!(untimed.last_hw_time_ns(), None, "no stats object without a mask");
}

#[test]
fn a_failed_load_is_retried_once() {
    if in_child() {
        setup();
        let (program, weights) = program();
        match open(None).compile(&program, &weights) {
            Ok(mut kernel) => println!("compiled: {:?}", eval(kernel.as_mut())[1][..2].to_vec()),
            Err(e) => println!("error: {}", e.message),
        }
        return;
    }
    // One failed load: the retry loads it.
    let out = run_child("a_failed_load_is_retried_once", &[(ane_emu::FAIL_LOADS_ENV, "1")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(text.contains("compiled: "), "{text}");
    // Two: the retry fails too, and the error is the framework's.
    let out = run_child("a_failed_load_is_retried_once", &[(ane_emu::FAIL_LOADS_ENV, "2")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(text.contains("error: ANE: loading `main` failed: "), "{text}");
    assert!(text.contains("injected by ANETRAIN_ANE_EMU_FAIL_LOADS"), "{text}");
}

/// `compileWithQoS:options:error:` sent with the prototype of
/// `Runtime::send_qos_options_error` minus its `qos` argument.
#[test]
fn a_send_with_a_missing_argument_is_caught_and_named() {
    if in_child() {
        setup();
        let rt = Runtime::get().unwrap();
        let _pool = rt.pool();
        let options = rt.make(&ns::no_options()).unwrap();
        let model_class = rt.class("_ANEInMemoryModel");
        let text = rt.make(&ns::mil_text("program(1.3)")).unwrap();
        let weights = rt.make(&ns::no_options()).unwrap();
        // SAFETY: deliberately not: the prototype below lacks `unsigned int qos`.
        unsafe {
            let descriptor = rt.send_id3(
                rt.class("_ANEInMemoryModelDescriptor"),
                "modelWithMILText:weights:optionsPlist:",
                text.as_ptr(),
                weights.as_ptr(),
                std::ptr::null_mut(),
            );
            let model = rt.send_id1(model_class, "inMemoryModelWithDescriptor:", descriptor);
            let wrong = std::mem::transmute::<unsafe extern "C" fn(), unsafe extern "C" fn(Id, Sel, Id, *mut Id) -> i8>(
                rt.msg_send_raw(),
            );
            let mut error: Id = std::ptr::null_mut();
            wrong(model, rt.sel("compileWithQoS:options:error:"), options.as_ptr(), &mut error);
        }
        println!("not caught");
        return;
    }
    let out = run_child("a_send_with_a_missing_argument_is_caught_and_named", &[]);
    aborted_with(&out, &["ane-emu: `compileWithQoS:options:error:` argument `"]);
    assert!(!stderr(&out).contains("not caught"));
}

#[test]
fn a_message_to_a_released_object_is_a_use_after_release() {
    if in_child() {
        setup();
        let rt = Runtime::get().unwrap();
        let array = rt.array(&[]);
        let raw = array.as_ptr();
        drop(array);
        // SAFETY: deliberately not: `raw` was released.
        unsafe { rt.send_id(raw, "retain") };
        return;
    }
    let out = run_child("a_message_to_a_released_object_is_a_use_after_release", &[]);
    aborted_with(&out, &["`retain` argument `self`: NSArray#", "already released (use after release)"]);
}

#[test]
fn an_unknown_selector_is_named() {
    if in_child() {
        setup();
        let rt = Runtime::get().unwrap();
        let array = rt.array(&[]);
        // SAFETY: deliberately sends a selector the class does not have.
        unsafe { rt.send_id(array.as_ptr(), "frobnicate") };
        return;
    }
    let out = run_child("an_unknown_selector_is_named", &[]);
    aborted_with(&out, &["unknown selector `frobnicate` sent to instance of NSArray"]);
}

#[test]
fn an_object_left_alive_at_exit_fails_the_process() {
    if in_child() {
        setup();
        let rt = Runtime::get().unwrap();
        let surface = rt.create_surface(4096).unwrap();
        std::mem::forget(surface);
        return;
    }
    let out = run_child("an_object_left_alive_at_exit_fails_the_process", &[]);
    assert_eq!(out.status.code(), Some(ane_emu::LEAK_EXIT_STATUS), "{}", stderr(&out));
    assert!(stderr(&out).contains("1 objects leaked at exit: IOSurface#"), "{}", stderr(&out));
}

#[test]
fn writing_a_surface_locked_read_only_is_an_error() {
    if in_child() {
        setup();
        let rt = Runtime::get().unwrap();
        let surface = rt.create_surface(4096).unwrap();
        // SAFETY: the emulation's IOSurface functions, with their C prototypes.
        unsafe {
            let lib = libloading::Library::new(library()).unwrap();
            let lock = lib.get::<unsafe extern "C" fn(Id, u32, *mut u32) -> i32>(b"IOSurfaceLock\0").unwrap();
            let unlock = lib.get::<unsafe extern "C" fn(Id, u32, *mut u32) -> i32>(b"IOSurfaceUnlock\0").unwrap();
            let base = lib.get::<unsafe extern "C" fn(Id) -> *mut u8>(b"IOSurfaceGetBaseAddress\0").unwrap();
            assert_eq!(lock(surface.as_ptr(), 1, std::ptr::null_mut()), 0);
            *base(surface.as_ptr()) = 7;
            unlock(surface.as_ptr(), 1, std::ptr::null_mut());
        }
        return;
    }
    let out = run_child("writing_a_surface_locked_read_only_is_an_error", &[]);
    aborted_with(&out, &["IOSurface#", "was written while locked read-only"]);
}

#[test]
fn the_reported_rejections_fail_with_the_reported_errors() {
    if in_child() {
        setup();
        let (program, weights) = program();
        let ane = open(None);
        let rule = std::env::var(ane_emu::REJECT_ENV).unwrap();
        let e = match ane.compile(&program, &weights) {
            Err(e) => e,
            Ok(mut kernel) => {
                let (x, bias) = inputs();
                let mut y = Surface::zeros(DType::Fp32, &[1, 64, 1, 32]);
                let mut d = Surface::zeros(DType::Fp32, &[1, 64, 1, 32]);
                kernel.eval(&[&x, &bias], &mut [&mut y, &mut d]).unwrap_err()
            }
        };
        println!("{rule}: {:?}: {}", e.kind, e.message);
        return;
    }
    let out =
        run_child("the_reported_rejections_fail_with_the_reported_errors", &[(ane_emu::REJECT_ENV, "multi-input")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(text.contains("multi-input: Eval: ANE: evaluating `main` failed: "), "{text}");
    assert!(text.contains("status=0x1d") && text.contains("hint: status 0x1d"), "{text}");

    let out = run_child("the_reported_rejections_fail_with_the_reported_errors", &[(ane_emu::REJECT_ENV, "cast")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("cast: Compile: ANE: compiling `main` failed: "), "{text}");
    assert!(text.contains("cast is not supported"), "{text}");

    let out = run_child(
        "the_reported_rejections_fail_with_the_reported_errors",
        &[(ane_emu::REJECT_ENV, "budget"), (ane_emu::COMPILE_LIMIT_ENV, "0")],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ANECCompile() FAILED (compile 1 of this process"), "{text}");
    assert!(text.contains("hint: the ANE compiler rejects some valid MIL"), "{text}");
}

/// The emulated ANE binds by the rule in force: with declaration order, anetrain's
/// default alphabetical plan hands it `bias` for `x` (and `doubled` for `y`), and the
/// results are not the CPU's. So a binding mistake cannot pass unnoticed.
#[test]
fn the_binding_rule_in_force_decides_which_surface_is_which() {
    if in_child() {
        setup();
        let (program, weights) = program();
        let mut kernel = open(None).compile(&program, &weights).unwrap();
        let cpu = CpuDevice::new(Precision::Fp16);
        let same = eval(kernel.as_mut()) == eval(cpu.compile(&program, &weights).unwrap().as_mut());
        println!("same as the cpu: {same}");
        return;
    }
    for (rule, same) in [("alphabetical", true), ("declaration", false)] {
        let out = run_child("the_binding_rule_in_force_decides_which_surface_is_which", &[(ane_emu::BIND_ENV, rule)]);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("same as the cpu: {same}")), "{rule}: {text}");
    }
}
