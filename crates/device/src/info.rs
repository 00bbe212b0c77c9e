//! What `anetrain devices` lists: the CPU (model, threads, SIMD features, precisions)
//! and the ANE (present and in which dialect, or absent and why).
//!
//! ```
//! let infos = device::info::describe();
//! assert_eq!(infos[0].name, "cpu");
//! assert!(infos[0].available);
//! assert_eq!(infos[1].name, "ane");
//! let text = device::info::format(&infos);
//! assert!(text.starts_with("cpu"));
//! ```

use serde::Serialize;

use crate::ane::{AneDevice, DEFAULT_QOS};
use crate::{Device, Error};

/// One device, described.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceInfo {
    /// `cpu` or `ane`: what `--device` takes.
    pub name: String,
    pub available: bool,
    /// One line: the model, or why the device is absent.
    pub summary: String,
    /// Further facts as `(label, value)`.
    pub details: Vec<(String, String)>,
}

/// Every device anetrain knows, available or not. Opening the ANE to describe it costs
/// one compile or two (the dialect test).
pub fn describe() -> Vec<DeviceInfo> {
    let ane = AneDevice::open();
    vec![describe_cpu(), describe_ane(ane.as_ref())]
}

/// The CPU device's facts.
pub fn describe_cpu() -> DeviceInfo {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let simd = simd_features();
    DeviceInfo {
        name: "cpu".into(),
        available: true,
        summary: format!("{} ({}), {threads} threads", cpu_model(), std::env::consts::ARCH),
        details: vec![
            ("simd".into(), if simd.is_empty() { "none detected".into() } else { simd.join(" ") }),
            ("precisions".into(), "fp32; fp16 (rounds every op's result to fp16, as the ANE computes)".into()),
        ],
    }
}

/// The ANE's facts, from an attempt to open it.
pub fn describe_ane(opened: Result<&AneDevice, &Error>) -> DeviceInfo {
    match opened {
        Ok(ane) => DeviceInfo {
            name: "ane".into(),
            available: true,
            summary: match std::env::var_os(crate::ane::runtime::FRAMEWORKS_ENV) {
                // Never let an emulated run pass for one on hardware.
                Some(images) => format!(
                    "Apple Neural Engine, emulated by {} ({}; not run on hardware)",
                    images.to_string_lossy(),
                    crate::ane::runtime::FRAMEWORKS_ENV
                ),
                None => format!("Apple Neural Engine on {}", chip_name().unwrap_or_else(|| "an unknown chip".into())),
            },
            details: vec![
                ("dialect".into(), format!("{} — {}", ane.dialect(), ane.dialect_note())),
                ("precision".into(), "fp16 compute".into()),
                (
                    "compile budget".into(),
                    format!(
                        "{} of {} left in this process",
                        ane.compiles_left().unwrap_or(0),
                        ane.config().compile_limit
                    ),
                ),
                ("qos".into(), format!("{} (default {DEFAULT_QOS})", ane.config().qos)),
            ],
        },
        Err(e) => DeviceInfo { name: "ane".into(), available: false, summary: e.message.clone(), details: Vec::new() },
    }
}

/// The devices as a small table.
pub fn format(infos: &[DeviceInfo]) -> String {
    let mut out = String::new();
    for d in infos {
        let state = if d.available { "available" } else { "absent" };
        out.push_str(&format!("{:<5} {:<10} {}\n", d.name, state, d.summary));
        for (label, value) in &d.details {
            out.push_str(&format!("{:<5} {:<16} {value}\n", "", label));
        }
    }
    out
}

/// The CPU's model name: from /proc/cpuinfo on Linux, sysctl on macOS.
pub fn cpu_model() -> String {
    let from_proc = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|t| cpu_model_from_cpuinfo(&t));
    from_proc.or_else(|| sysctl("machdep.cpu.brand_string")).unwrap_or_else(|| "unknown CPU".into())
}

/// The model name in /proc/cpuinfo text: `model name` (x86), else `Hardware` or
/// `Processor` (some ARM kernels; keys are case-sensitive: lowercase `processor` is the
/// CPU's index), else the ARM implementer/part numbers.
pub fn cpu_model_from_cpuinfo(text: &str) -> Option<String> {
    let field = |key: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key && !v.trim().is_empty()).then(|| v.trim().to_string())
        })
    };
    field("model name").or_else(|| field("Hardware")).or_else(|| field("Processor")).or_else(|| {
        let (imp, part) = (field("CPU implementer")?, field("CPU part")?);
        Some(format!("ARM CPU (implementer {imp}, part {part})"))
    })
}

/// The chip's name on a Mac (`Apple M3 Pro`).
fn chip_name() -> Option<String> {
    sysctl("machdep.cpu.brand_string")
}

fn sysctl(key: &str) -> Option<String> {
    if !cfg!(target_os = "macos") {
        return None;
    }
    let out = std::process::Command::new("sysctl").args(["-n", key]).output().ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

/// SIMD features this CPU has that the CPU device's kernels can use.
pub fn simd_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut found = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! x86 {
            ($($f:tt),*) => { $( if std::arch::is_x86_feature_detected!($f) { found.push($f); } )* };
        }
        x86!("sse2", "sse4.1", "sse4.2", "avx", "avx2", "fma", "f16c", "avx512f");
    }
    #[cfg(target_arch = "aarch64")]
    {
        macro_rules! arm {
            ($($f:tt),*) => { $( if std::arch::is_aarch64_feature_detected!($f) { found.push($f); } )* };
        }
        arm!("neon", "fp16", "dotprod", "bf16", "i8mm");
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn cpu_models_are_read_from_cpuinfo_of_either_architecture() {
        let x86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n";
        assert_eq!(cpu_model_from_cpuinfo(x86).as_deref(), Some("Intel(R) Xeon(R) CPU @ 2.20GHz"));
        let pi =
            "processor\t: 0\nBogoMIPS\t: 108.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd08\n\nHardware\t: BCM2835\n";
        assert_eq!(cpu_model_from_cpuinfo(pi).as_deref(), Some("BCM2835"));
        let graviton = "processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n";
        assert_eq!(cpu_model_from_cpuinfo(graviton).as_deref(), Some("ARM CPU (implementer 0x41, part 0xd0c)"));
        assert_eq!(cpu_model_from_cpuinfo("model name\t:\n"), None);
        assert_eq!(cpu_model_from_cpuinfo(""), None);
    }

    #[test]
    fn an_absent_ane_is_listed_with_its_reason() {
        let e = Error::unavailable("AppleNeuralEngine.framework is only on macOS (this is linux)");
        let info = describe_ane(Err(&e));
        assert_eq!(info.name, "ane");
        assert!(!info.available);
        assert_eq!(
            info.summary,
            "ANE not available on this system: AppleNeuralEngine.framework is only on macOS (this is linux)"
        );
        assert_eq!(e.kind, ErrorKind::Unavailable);
    }

    #[test]
    fn the_listing_is_a_table() {
        let infos = vec![
            DeviceInfo {
                name: "cpu".into(),
                available: true,
                summary: "Some CPU (x86_64), 2 threads".into(),
                details: vec![("simd".into(), "sse2 avx2".into())],
            },
            DeviceInfo { name: "ane".into(), available: false, summary: "ANE not available".into(), details: vec![] },
        ];
        assert_eq!(
            format(&infos),
            "cpu   available  Some CPU (x86_64), 2 threads\n      simd             sse2 avx2\nane   absent     ANE not available\n"
        );
    }

    #[test]
    fn the_cpu_is_described_with_features_and_precisions() {
        let cpu = describe_cpu();
        assert!(cpu.available);
        assert!(cpu.summary.contains(std::env::consts::ARCH), "{}", cpu.summary);
        let labels: Vec<&str> = cpu.details.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(labels, ["simd", "precisions"]);
        if cfg!(target_arch = "x86_64") {
            // Every x86_64 CPU has SSE2: the detection runs and finds it.
            assert!(simd_features().contains(&"sse2"));
        }
    }
}
