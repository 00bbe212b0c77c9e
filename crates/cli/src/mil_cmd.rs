//! `anetrain mil …`: check, format and run MIL programs on the command line.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Subcommand, ValueEnum};
use device::{cpu::CpuDevice, Device, Precision, Surface};
use mil::blob::{ModelDir, Weights};
use mil::lint::Severity;
use mil::{Dialect, Program};

use crate::npy;

#[derive(Subcommand, Debug)]
pub enum MilCommand {
    /// Parse, validate and lint a `.mil` file or a model directory. Errors exit 1;
    /// warnings are printed.
    Check { path: PathBuf },
    /// Print a program in a dialect.
    Fmt {
        path: PathBuf,
        #[arg(long, value_enum, default_value = "ios18")]
        dialect: DialectArg,
    },
    /// Run a model directory on the CPU device with .npy inputs; writes DIR/NAME.npy per output.
    Run {
        model_dir: PathBuf,
        /// An input as NAME=FILE.npy (repeat for each input).
        #[arg(long = "input", value_name = "NAME=FILE.npy")]
        inputs: Vec<String>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "fp32")]
        precision: Precision,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DialectArg {
    Ios16,
    Ios18,
}

impl From<DialectArg> for Dialect {
    fn from(d: DialectArg) -> Dialect {
        match d {
            DialectArg::Ios16 => Dialect::Ios16,
            DialectArg::Ios18 => Dialect::Ios18,
        }
    }
}

pub fn run(cmd: MilCommand) -> Result<()> {
    match cmd {
        MilCommand::Check { path } => check(&path),
        MilCommand::Fmt { path, dialect } => {
            let (program, _) = load(&path)?;
            print!("{}", mil::text::print(&program.to_dialect(dialect.into())));
            Ok(())
        }
        MilCommand::Run { model_dir, inputs, out, precision } => run_model(&model_dir, &inputs, &out, precision),
    }
}

/// Reads a `.mil` file (no weights) or a model directory (`model.mil` + `weights/`),
/// parsed and validated.
fn load(path: &Path) -> Result<(Program, Weights)> {
    if path.is_dir() {
        let dir = ModelDir::read(path)?;
        Ok((dir.program, dir.weights))
    } else {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let program = mil::text::parse_and_validate(&text).map_err(|e| e.in_file(path))?;
        Ok((program, Weights::new()))
    }
}

fn check(path: &Path) -> Result<()> {
    let (program, _) = load(path)?;
    let findings = mil::lint::lint(&program);
    let mut errors = 0;
    for f in &findings {
        if f.severity == Severity::Error {
            errors += 1;
        }
        eprintln!("{}: {f}", path.display());
    }
    if errors > 0 {
        bail!("{}: {errors} ANE lint error(s): the ANE would reject this program or compute it wrong", path.display());
    }
    let f = program.main().expect("validated programs have a function");
    println!(
        "{}: ok — {} ops, {} inputs, {} outputs, {} lint warning(s)",
        path.display(),
        f.ops.len(),
        f.inputs.len(),
        f.outputs.len(),
        findings.len()
    );
    Ok(())
}

fn run_model(model_dir: &Path, inputs: &[String], out: &Path, precision: Precision) -> Result<()> {
    let (program, weights) = load(model_dir)?;
    let device = CpuDevice::new(precision);
    let mut kernel = device.compile(&program, &weights)?;
    let mut given: Vec<(String, PathBuf)> = Vec::new();
    for spec in inputs {
        let Some((name, file)) = spec.split_once('=') else {
            bail!("--input `{spec}`: expected NAME=FILE.npy");
        };
        if given.iter().any(|(n, _)| n == name) {
            bail!("--input `{name}` is given twice");
        }
        given.push((name.to_string(), PathBuf::from(file)));
    }
    let mut surfaces = Vec::new();
    for var in kernel.inputs() {
        let Some((_, file)) = given.iter().find(|(n, _)| n == &var.name) else {
            bail!("the program needs input `{}` ({}); pass --input {}=FILE.npy", var.name, var.ty, var.name);
        };
        let arr = npy::read(file)?;
        if arr.shape != var.ty.shape || arr.dtype != var.ty.dtype {
            bail!(
                "{}: holds {} {:?}, but input `{}` is declared {}",
                file.display(),
                arr.dtype,
                arr.shape,
                var.name,
                var.ty
            );
        }
        surfaces.push(Surface::from_f32(var.ty.dtype, &var.ty.shape, &arr.data));
    }
    for (name, _) in &given {
        if !kernel.inputs().iter().any(|v| &v.name == name) {
            let names: Vec<&str> = kernel.inputs().iter().map(|v| v.name.as_str()).collect();
            bail!("--input `{name}`: the program has no such input (inputs: {})", names.join(", "));
        }
    }
    let mut outputs: Vec<Surface> = kernel.outputs().iter().map(|v| Surface::zeros(v.ty.dtype, &v.ty.shape)).collect();
    {
        let ins: Vec<&Surface> = surfaces.iter().collect();
        let mut outs: Vec<&mut Surface> = outputs.iter_mut().collect();
        kernel.eval(&ins, &mut outs)?;
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for (var, s) in kernel.outputs().iter().zip(&outputs) {
        let path = out.join(format!("{}.npy", var.name));
        npy::write(&path, s.dtype(), s.shape(), &s.to_f32())?;
        println!("{}: {} {:?}", path.display(), s.dtype(), s.shape());
    }
    Ok(())
}
