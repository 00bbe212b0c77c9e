//! `anetrain mil`, `devices` and `probe` as a user runs them: exit codes, messages, files.

use std::path::Path;
use std::process::{Command, Output};

fn anetrain(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_anetrain")).args(args).current_dir(dir).output().expect("anetrain runs")
}

const PROGRAM: &str = r#"program(1.3)
[buildInfo = dict<string, string>({{"coremlc-version", "3505.4.1"}})]
{
    func main<ios18>(tensor<fp32, [1, 4, 1, 16]> x) {
        fp32 two = const()[name = string("two"), val = fp32(2)];
        tensor<fp32, [1, 4, 1, 16]> y = mul(x = x, y = two)[name = string("y")];
    } -> (y);
}
"#;

/// A .npy file of float32 values, written byte by byte from the format's spec.
fn npy_f32(path: &Path, shape: &[usize], data: &[f32]) {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({},), }}", dims.join(", "));
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn check_fmt_and_run_a_program() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("model")).unwrap();
    std::fs::write(d.join("model/model.mil"), PROGRAM).unwrap();
    let out = anetrain(d, &["mil", "check", "model"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));

    let out = anetrain(d, &["mil", "fmt", "model/model.mil", "--dialect", "ios16"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("program(1.0)"), "{text}");
    assert!(text.contains("tensor<fp32, []>(2)"), "{text}");

    let x: Vec<f32> = (0..64).map(|i| i as f32 - 20.5).collect();
    npy_f32(&d.join("x.npy"), &[1, 4, 1, 16], &x);
    let out = anetrain(d, &["mil", "run", "model", "--input", "x=x.npy", "--out", "out"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let y = std::fs::read(d.join("out/y.npy")).unwrap();
    // The header says float32 and the declared shape; the payload is 2·x.
    let header_len = u16::from_le_bytes([y[8], y[9]]) as usize;
    let header = String::from_utf8_lossy(&y[10..10 + header_len]);
    assert!(header.contains("<f4") && header.contains("(1, 4, 1, 16"), "{header}");
    let values: Vec<f32> = y[10 + header_len..].chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(values, x.iter().map(|v| 2.0 * v).collect::<Vec<_>>());
}

#[test]
fn bad_programs_and_inputs_exit_1_with_a_location() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("bad.mil"), PROGRAM.replace("mul(x = x, y = two)", "mul(x = x, y = tw0)")).unwrap();
    let out = anetrain(d, &["mil", "check", "bad.mil"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.mil:6:") && err.contains("tw0"), "{err}");

    std::fs::create_dir_all(d.join("m")).unwrap();
    std::fs::write(d.join("m/model.mil"), PROGRAM).unwrap();
    npy_f32(&d.join("wrong.npy"), &[1, 4, 1, 8], &[0.0; 32]);
    let out = anetrain(d, &["mil", "run", "m", "--input", "x=wrong.npy", "--out", "o"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("wrong.npy") && err.contains("[1, 4, 1, 8]"), "{err}");
    let out = anetrain(d, &["mil", "run", "m", "--out", "o"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs input `x`"));

    // A lint error (cast in an ios16 program) fails the check.
    let ios16 = PROGRAM
        .replace("program(1.3)", "program(1.0)")
        .replace("main<ios18>", "main<ios16>")
        .replace(
            "fp32 two = const()[name = string(\"two\"), val = fp32(2)];",
            "string d = const()[name = string(\"d\"), val = string(\"fp16\")];",
        )
        .replace(
            "tensor<fp32, [1, 4, 1, 16]> y = mul(x = x, y = two)",
            "tensor<fp16, [1, 4, 1, 16]> y = cast(dtype = d, x = x)",
        );
    std::fs::write(d.join("cast16.mil"), ios16).unwrap();
    let out = anetrain(d, &["mil", "check", "cast16.mil"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cast"));
}

#[test]
fn usage_errors_exit_1_and_the_ane_exits_2_here() {
    let dir = tempfile::tempdir().unwrap();
    let out = anetrain(dir.path(), &["train", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(1));
    if cfg!(target_os = "macos") {
        return;
    }
    let out = anetrain(dir.path(), &["probe", "--device", "ane"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ANE not available on this system"));
}

#[test]
fn devices_and_cpu_probes_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = anetrain(dir.path(), &["devices"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("cpu") && text.contains("ane"), "{text}");

    let out = anetrain(
        dir.path(),
        &[
            "probe",
            "dynamic-matmul",
            "compile-limit",
            "--device",
            "cpu",
            "--sim-compile-limit",
            "5",
            "--json",
            "p.json",
            "--iterations",
            "2",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("p.json")).unwrap()).unwrap();
    let text = json.to_string();
    assert!(text.contains("dynamic-matmul") && text.contains("compile-limit"), "{text}");

    let out = anetrain(dir.path(), &["probe", "no-such-probe", "--device", "cpu"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown probe"));
}
