//! `anetrain devices` and `anetrain probe`: what this machine has, and the ANE
//! characterisation suite (its CPU-meaningful probes also run on the CPU device).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use device::ane::{AneConfig, AneDevice};
use device::cpu::CpuDevice;
use device::probe::{self, ChildCommand, ProbeOptions, ProbeReport};
use device::{Device, Precision};

use crate::devices::DeviceArg;

#[derive(Args, Debug)]
pub struct ProbeArgs {
    /// Probes to run (default: all of them).
    pub names: Vec<String>,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceArg,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Timed evaluations per measurement.
    #[arg(long, default_value_t = 20)]
    pub iterations: usize,
    /// On the CPU device: the compile budget to emulate in the compile-limit probe.
    #[arg(long, default_value_t = device::cpu::ANE_COMPILE_BUDGET)]
    pub sim_compile_limit: usize,
}

/// The hidden child of the compile-limit probe: compiles until failure, prints one line.
#[derive(Args, Debug)]
pub struct ProbeChildArgs {
    #[arg(long, value_enum)]
    pub device: DeviceArg,
    #[arg(long)]
    pub sim_compile_limit: Option<usize>,
    #[arg(long)]
    pub max_compiles: usize,
}

pub fn devices() -> Result<()> {
    print!("{}", device::info::format(&device::info::describe()));
    Ok(())
}

/// How many compiles the child tries at most before reporting "no limit found".
const CHILD_MAX_COMPILES: usize = 300;

pub fn probe(args: ProbeArgs) -> Result<std::process::ExitCode> {
    let ane = match args.device {
        DeviceArg::Cpu => None,
        DeviceArg::Ane => Some(AneDevice::open()?),
        DeviceArg::Auto => AneDevice::open().ok(),
    };
    let on_ane = ane.is_some();
    let mut child_args: Vec<String> =
        vec!["__probe-child".into(), "--max-compiles".into(), CHILD_MAX_COMPILES.to_string()];
    if on_ane {
        child_args.extend(["--device".into(), "ane".into()]);
    } else {
        child_args.extend([
            "--device".into(),
            "cpu".into(),
            "--sim-compile-limit".into(),
            args.sim_compile_limit.to_string(),
        ]);
    }
    let options = ProbeOptions {
        iterations: args.iterations.max(1),
        compile_limit_child: Some(ChildCommand {
            program: std::env::current_exe().context("cannot find this program's path for the compile-limit child")?,
            args: child_args,
            env: Vec::new(),
        }),
    };
    let (report, device_name) = match &ane {
        Some(a) => (ProbeReport::new(a, probe::run_ane(&args.names, a, &options)?), "ane"),
        None => {
            let cpu = CpuDevice::new(Precision::Fp32);
            (ProbeReport::new(&cpu, probe::run(&args.names, &cpu, &options)?), "cpu")
        }
    };
    print!("{}", report.table());
    if let Some(path) = &args.json {
        std::fs::write(path, report.to_json()).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote {} ({device_name})", path.display());
    }
    Ok(std::process::ExitCode::from(report.exit_code() as u8))
}

pub fn probe_child(args: ProbeChildArgs) -> Result<()> {
    let device: Box<dyn Device> = match args.device {
        DeviceArg::Ane => {
            Box::new(AneDevice::open_with(AneConfig { compile_limit: usize::MAX, ..Default::default() })?)
        }
        _ => {
            let mut cpu = CpuDevice::new(Precision::Fp32);
            if let Some(n) = args.sim_compile_limit {
                cpu = cpu.with_compile_limit(n);
            }
            Box::new(cpu)
        }
    };
    println!("{}", probe::compile_limit_child(device.as_ref(), args.max_compiles).line());
    Ok(())
}
