//! The compile-limit probe for real: the parent spawns this very test binary as its
//! child, which compiles on a CPU device emulating a budget of 7 compiles and prints its
//! report; the parent finds the limit in it.

use device::cpu::CpuDevice;
use device::probe::{self, ChildCommand, ChildReport, ProbeOptions, ProbeStatus};
use device::Precision;

const CHILD_ENV: &str = "ANETRAIN_TEST_COMPILE_LIMIT_CHILD";
const CHILD_TEST: &str = "compile_limit_child_entry_point";

/// As the child (the environment variable set): the body of `anetrain`'s hidden child
/// command, on an emulated budget of 7. Run normally: the same function, in-process, on
/// a budget of 3, checked.
#[test]
fn compile_limit_child_entry_point() {
    if std::env::var_os(CHILD_ENV).is_some() {
        let cpu = CpuDevice::new(Precision::Fp32).with_compile_limit(7);
        println!("{}", probe::compile_limit_child(&cpu, 50).line());
        return;
    }
    let report = probe::compile_limit_child(&CpuDevice::new(Precision::Fp16).with_compile_limit(3), 50);
    assert_eq!(report.compiles_ok, 3);
    assert_eq!(report.failure_kind.as_deref(), Some("compile-budget"));
    assert!(report.failure.as_deref().unwrap().starts_with("compile budget spent"), "{report:?}");
    // Without a budget it stops at the cap.
    let report = probe::compile_limit_child(&CpuDevice::new(Precision::Fp32), 4);
    assert_eq!((report.compiles_ok, report.failure_kind), (4, None));
}

fn child(args: &[&str]) -> ChildCommand {
    ChildCommand {
        program: std::env::current_exe().unwrap(),
        args: args.iter().map(|s| s.to_string()).collect(),
        env: vec![(CHILD_ENV.to_string(), "1".to_string())],
    }
}

#[test]
fn the_probe_finds_the_emulated_limit_in_a_child_process() {
    let options = ProbeOptions {
        compile_limit_child: Some(child(&["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])),
        ..ProbeOptions::default()
    };
    // The parent's device is not the one that compiles: its budget is untouched.
    let parent = CpuDevice::new(Precision::Fp32).with_compile_limit(1);
    let r = &probe::run(&["compile-limit".to_string()], &parent, &options).unwrap()[0];
    assert_eq!(r.status, ProbeStatus::Passed, "{r:#?}");
    assert_eq!(r.measurement("compiles_before_failure"), Some(7.0));
    assert!(r.summary.starts_with("7 programs compiled and ran; then compile-budget: "), "{}", r.summary);
    assert_eq!(device::Device::compiles_done(&parent), 0);
}

#[test]
fn a_child_that_reports_nothing_fails_the_probe() {
    let options = ProbeOptions {
        compile_limit_child: Some(child(&["--exact", "no_test_has_this_name"])),
        ..ProbeOptions::default()
    };
    let r = &probe::run(&["compile-limit".to_string()], &CpuDevice::new(Precision::Fp32), &options).unwrap()[0];
    assert_eq!(r.status, ProbeStatus::Failed);
    assert!(r.summary.contains("printed no `anetrain-probe-child:` line"), "{}", r.summary);
}

#[test]
fn the_child_line_is_found_among_other_output() {
    let report = ChildReport {
        compiles_ok: 119,
        failure_kind: Some("compile".into()),
        failure: Some("x".into()),
        max_compiles: 500,
    };
    let stdout = format!("running 1 test\n{}\ntest ok\n", report.line());
    assert_eq!(ChildReport::parse(&stdout), Some(report));
    assert_eq!(ChildReport::parse("running 1 test\n"), None);
    assert_eq!(ChildReport::parse("anetrain-probe-child: {not json"), None);
}
