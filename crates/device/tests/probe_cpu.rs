//! The probe suite on the CPU device: the probes that mean something anywhere pass in
//! both precisions, fail on a device that computes wrongly, and the ANE-only ones say
//! they do not apply.

use device::cpu::CpuDevice;
use device::probe::{self, IoChoice, IoVariant, ProbeOptions, ProbeReport, ProbeResult, ProbeStatus, PROBES};
use device::{Device, Kernel, Precision, Result, Surface, Weights};
use mil::{Dialect, Program, Var};

const GENERIC: [&str; 5] = ["dynamic-matmul", "weight-reload", "compile-eval-overlap", "dispatch-overhead", "peak"];
const ANE_ONLY: [&str; 4] = ["weights-buffer", "io-order", "qos-sweep", "perf-stats"];

fn quick() -> ProbeOptions {
    ProbeOptions { iterations: 2, ..ProbeOptions::default() }
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn by_name<'a>(results: &'a [ProbeResult], name: &str) -> &'a ProbeResult {
    results.iter().find(|r| r.name == name).unwrap_or_else(|| panic!("no result for {name}"))
}

#[test]
fn generic_probes_pass_on_the_cpu_in_both_precisions() {
    for precision in [Precision::Fp32, Precision::Fp16] {
        let cpu = CpuDevice::new(precision);
        let results = probe::run(&names(&GENERIC), &cpu, &quick()).unwrap();
        assert_eq!(results.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), GENERIC);
        for r in &results {
            assert_eq!(r.status, ProbeStatus::Passed, "{precision:?}: {r:#?}");
        }
        let reload = by_name(&results, "weight-reload");
        assert_eq!(reload.measurement("baked_at_compile"), Some(1.0), "the CPU device reads weights at compile");
        let mm = by_name(&results, "dynamic-matmul");
        assert!(mm.measurement("max_relative_error").unwrap() <= mm.measurement("tolerance").unwrap());
        assert!(by_name(&results, "peak").measurement("tflops").unwrap() > 0.0);
    }
}

#[test]
fn generic_probes_also_run_in_the_ios16_dialect() {
    let cpu = CpuDevice::new(Precision::Fp16).with_dialect(Dialect::Ios16);
    let results = probe::run(&names(&["dynamic-matmul", "weight-reload", "peak"]), &cpu, &quick()).unwrap();
    for r in &results {
        assert_eq!(r.status, ProbeStatus::Passed, "{r:#?}");
    }
}

#[test]
fn ane_only_probes_do_not_apply_to_the_cpu() {
    let cpu = CpuDevice::new(Precision::Fp32);
    let results = probe::run(&names(&ANE_ONLY), &cpu, &quick()).unwrap();
    for r in &results {
        assert_eq!(r.status, ProbeStatus::NotApplicable, "{r:#?}");
        assert!(r.summary.starts_with("the cpu device "), "{}", r.summary);
    }
    assert_eq!(by_name(&results, "qos-sweep").summary, "the cpu device has no QoS classes");
}

#[test]
fn compile_limit_needs_a_child_command() {
    let cpu = CpuDevice::new(Precision::Fp32);
    let r = &probe::run(&names(&["compile-limit"]), &cpu, &quick()).unwrap()[0];
    assert_eq!(r.status, ProbeStatus::Unavailable);
    assert!(r.summary.contains("runs in a child process"), "{}", r.summary);
}

#[test]
fn unknown_probes_are_refused_before_anything_runs() {
    let cpu = CpuDevice::new(Precision::Fp32).with_compile_limit(0);
    let e = probe::run(&names(&["peak", "warp-drive"]), &cpu, &quick()).unwrap_err();
    assert_eq!(e.name, "warp-drive");
    let text = e.to_string();
    assert!(text.starts_with("unknown probe `warp-drive`; the probes are: dynamic-matmul, weight-reload"), "{text}");
    assert_eq!(cpu.compiles_done(), 0);
}

#[test]
fn no_names_runs_every_probe_in_order() {
    let cpu = CpuDevice::new(Precision::Fp32);
    let results = probe::run(&[], &cpu, &ProbeOptions { iterations: 1, ..ProbeOptions::default() }).unwrap();
    let got: Vec<&str> = results.iter().map(|r| r.name.as_str()).collect();
    let want: Vec<&str> = PROBES.iter().map(|(n, _)| *n).collect();
    assert_eq!(got, want);
    let report = ProbeReport::new(&cpu, results);
    assert_eq!(report.exit_code(), 0);
    assert!(report.table().ends_with("6 passed, 0 failed, 4 not applicable, 1 unavailable\n"), "{}", report.table());
}

#[test]
fn a_spent_budget_makes_probes_unavailable_not_failed() {
    let cpu = CpuDevice::new(Precision::Fp32).with_compile_limit(1);
    let results = probe::run(&names(&["dynamic-matmul", "weight-reload"]), &cpu, &quick()).unwrap();
    assert_eq!(results[0].status, ProbeStatus::Passed);
    assert_eq!(results[1].status, ProbeStatus::Unavailable);
    assert_eq!(results[1].summary, "needs 2 compiles and this process has 0 left; run it in a fresh process");
}

/// A device that computes like the CPU device, then gets the first output element wrong.
struct Corrupting(CpuDevice);
struct CorruptKernel(Box<dyn Kernel>);

impl Kernel for CorruptKernel {
    fn inputs(&self) -> &[Var] {
        self.0.inputs()
    }
    fn outputs(&self) -> &[Var] {
        self.0.outputs()
    }
    fn eval(&mut self, inputs: &[&Surface], outputs: &mut [&mut Surface]) -> Result<()> {
        self.0.eval(inputs, outputs)?;
        let v = outputs[0].to_f32()[0];
        outputs[0].write_f32_at(0, &[v + 0.5]);
        Ok(())
    }
}

impl Device for Corrupting {
    fn name(&self) -> &str {
        "corrupting"
    }
    fn dialect(&self) -> Dialect {
        self.0.dialect()
    }
    fn precision(&self) -> Precision {
        self.0.precision()
    }
    fn compile(&self, program: &Program, weights: &Weights) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(CorruptKernel(self.0.compile(program, weights)?)))
    }
    fn compiles_left(&self) -> Option<usize> {
        self.0.compiles_left()
    }
    fn compiles_done(&self) -> usize {
        self.0.compiles_done()
    }
}

#[test]
fn probes_fail_on_a_device_that_computes_wrongly() {
    let bad = Corrupting(CpuDevice::new(Precision::Fp32));
    let results =
        probe::run(&names(&["dynamic-matmul", "weight-reload", "compile-eval-overlap", "peak"]), &bad, &quick())
            .unwrap();
    for r in &results {
        assert_eq!(r.status, ProbeStatus::Failed, "{r:#?}");
    }
    assert!(by_name(&results, "dynamic-matmul").summary.starts_with("DIFFERS from a naive matmul"));
    let report = ProbeReport::new(&bad, results);
    assert_eq!(report.exit_code(), 1);
}

#[test]
fn reports_round_trip_through_json_and_print_as_a_table() {
    let cpu = CpuDevice::new(Precision::Fp32);
    let results = probe::run(&names(&["dynamic-matmul", "qos-sweep"]), &cpu, &quick()).unwrap();
    let report = ProbeReport::new(&cpu, results);
    let json = report.to_json();
    let back: ProbeReport = serde_json::from_str(&json).unwrap();
    assert_eq!(back.to_json(), json);
    assert_eq!(back.results[0].summary, report.results[0].summary);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["device"], "cpu");
    assert_eq!(v["precision"], "fp32");
    assert_eq!(v["results"][1]["status"], "not-applicable");
    assert_eq!(v["results"][0]["measurements"][0]["name"], "max_relative_error");

    let table = report.table();
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("probes on cpu (ios18, fp32)"), "{table}");
    assert!(lines[1].starts_with("PROBE"), "{table}");
    assert!(lines[2].starts_with("dynamic-matmul         passed          matches a naive matmul"), "{table}");
    assert!(table.contains("qos-sweep              not applicable  the cpu device has no QoS classes"), "{table}");
}

#[test]
fn least_squares_recovers_a_line() {
    let points: Vec<(f64, f64)> = [1.0, 2.0, 5.0, 9.0].iter().map(|&x| (x, 3.0 + 0.5 * x)).collect();
    let (a, b) = probe::least_squares(&points);
    assert!((a - 3.0).abs() < 1e-12 && (b - 0.5).abs() < 1e-12, "{a} {b}");
}

#[test]
fn probe_programs_respect_the_lint() {
    for dialect in [Dialect::Ios18, Dialect::Ios16] {
        let p = probe::dynamic_matmul_program(dialect, 128, 96, 256).unwrap();
        assert_eq!(mil::lint::lint(&p), vec![], "{dialect}");
        assert_eq!(p.main().unwrap().ops.iter().any(|o| o.op == "cast"), dialect == Dialect::Ios18);
        let (p, w, _) = probe::conv_stack_program(dialect, 512, 1024, 12).unwrap();
        assert_eq!(mil::lint::lint(&p), vec![], "{dialect}");
        assert_eq!(p.blob_paths().len(), 12);
        assert_eq!(w.files().count(), 12);
        // io-order is meant to break the reported rules: several surfaces of unequal
        // input sizes, nothing else.
        let p = probe::io_order_program(dialect).unwrap();
        let mut rules: Vec<&str> = mil::lint::lint(&p).iter().map(|f| f.rule).collect();
        rules.sort();
        assert_eq!(rules, ["several-inputs", "several-outputs", "unequal-surface-sizes"], "{dialect}");
        // io-convention: the packed program is clean; each other variant breaks exactly
        // the rule it tries.
        for (variant, want) in [
            (IoVariant::Packed, vec![]),
            // In fp16 (ios16) its surfaces are half the bytes, under the reported 48 KiB
            // minimum too.
            (
                IoVariant::MultiDeclaration,
                if dialect == Dialect::Ios16 {
                    vec!["several-inputs", "several-outputs", "small-surface", "unequal-surface-sizes"]
                } else {
                    vec!["several-inputs", "several-outputs", "unequal-surface-sizes"]
                },
            ),
            (IoVariant::Rank2, vec!["rank"]),
            (IoVariant::Rank5, vec!["rank"]),
        ] {
            let p = probe::io_convention_program(dialect, variant).unwrap();
            // The rules each variant breaks, in name order (the lint's order is not part
            // of its contract).
            let mut rules: Vec<&str> = mil::lint::lint(&p).iter().map(|f| f.rule).collect();
            rules.sort();
            rules.dedup();
            assert_eq!(rules, want, "{variant:?} ({dialect})");
        }
    }
}

#[test]
fn io_convention_runs_every_variant_it_can_on_the_cpu() {
    for precision in [Precision::Fp32, Precision::Fp16] {
        let cpu = CpuDevice::new(precision);
        let results = probe::run(&names(&["io-convention"]), &cpu, &quick()).unwrap();
        let r = &results[0];
        assert_eq!(r.status, ProbeStatus::Passed, "{r:#?}");
        for v in ["packed", "multi_declaration_order", "rank2", "rank5"] {
            assert_eq!(r.measurement(&format!("{v}_correct")), Some(1.0), "{v} ({precision:?}): {r:#?}");
        }
        // The CPU device binds in declaration order: there is no alphabetical order.
        assert_eq!(r.measurement("multi_alphabetical_order_correct"), None);
        assert!(r.notes.iter().any(|n| n == "multi_alphabetical_order: not applicable on the cpu device"), "{r:#?}");
        assert_eq!(r.summary, "correct: packed, multi_declaration_order, rank2, rank5");
    }
    // A device that computes wrongly is caught by every variant.
    let bad = Corrupting(CpuDevice::new(Precision::Fp32));
    let r = &probe::run(&names(&["io-convention"]), &bad, &quick()).unwrap()[0];
    assert_eq!(r.status, ProbeStatus::Failed);
    assert_eq!(r.summary, "correct: none");
}

/// A report as `anetrain probe io-convention --device ane --json` writes it, with the
/// given variants correct.
fn ane_report(correct: &[&str], device: &str) -> String {
    let cpu = CpuDevice::new(Precision::Fp32);
    let mut results = probe::run(&names(&["io-convention"]), &cpu, &quick()).unwrap();
    results[0].measurements = IoVariant::ALL
        .iter()
        .map(|v| probe::Measurement {
            name: format!("{}_correct", v.name()),
            value: if correct.contains(&v.name()) { 1.0 } else { 0.0 },
            unit: "bool".into(),
        })
        .collect();
    let mut report = ProbeReport::new(&cpu, results);
    report.device = device.to_string();
    report.to_json()
}

#[test]
fn train_chooses_the_io_convention_from_the_probe_report() {
    let all = ["packed", "multi_declaration_order", "multi_alphabetical_order"];
    let choose = probe::choose_io_convention;
    assert_eq!(choose(&ane_report(&all, "ane"), false), Ok(IoChoice::Packed));
    assert_eq!(choose(&ane_report(&all, "ane"), true), Ok(IoChoice::Multi { declaration_order: true }));
    let alpha = ane_report(&["packed", "multi_alphabetical_order"], "ane");
    assert_eq!(choose(&alpha, true), Ok(IoChoice::Multi { declaration_order: false }));
    // Packed failing on a chip where several surfaces work: several surfaces.
    let no_packed = ane_report(&["multi_declaration_order"], "ane");
    assert_eq!(choose(&no_packed, false), Ok(IoChoice::Multi { declaration_order: true }));
    // Refusals say why.
    let e = choose(&ane_report(&["packed"], "ane"), true).unwrap_err();
    assert!(e.contains("no binding order") && e.contains("--ane-io packed"), "{e}");
    let e = choose(&ane_report(&[], "ane"), false).unwrap_err();
    assert!(e.contains("no convention"), "{e}");
    let e = choose(&ane_report(&all, "cpu"), false).unwrap_err();
    assert!(e.contains("anetrain probe io-convention --device ane"), "{e}");
    let e = choose("{}", false).unwrap_err();
    assert!(e.starts_with("not a probe report"), "{e}");
    let cpu = CpuDevice::new(Precision::Fp32);
    let other = ProbeReport::new(&cpu, probe::run(&names(&["dynamic-matmul"]), &cpu, &quick()).unwrap());
    let e = choose(&other.to_json(), false).unwrap_err();
    assert!(e.contains("run `anetrain probe io-convention --device ane`"), "{e}");
}
