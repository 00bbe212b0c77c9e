//! `anetrain`: train Llama models on Apple's Neural Engine, and run the same kernels on
//! any CPU. This binary only parses arguments, wires the library crates together and
//! prints; the numerics live in `mil`, `device`, `llama` and `train`.
//!
//! Exit status: 0 on success, 1 on a user error (a bad flag, file or input), 2 where the
//! system cannot do what was asked (no ANE here, say).

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

mod ane_model_cmd;
mod bench;
mod bench_against;
mod dashboard_cmd;
mod data_cmd;
mod devices;
mod hf_cmd;
mod lora_cmd;
mod mil_cmd;
mod npy;
mod probe_cmd;
mod sample;
mod serve;
mod train_cmd;

/// Train Llama-family transformers on Apple's Neural Engine — and run the very same
/// compiled kernels on any CPU.
#[derive(Parser, Debug)]
#[command(name = "anetrain", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model; with no arguments, the built-in tiny model on the built-in story corpus.
    Train(Box<train_cmd::TrainArgs>),
    /// Write a checkpoint as a llama2.c model.bin (and tokenizer.bin beside it).
    Export(train_cmd::ExportArgs),
    /// Sample text from a model (llama2.c model.bin or an anetrain checkpoint).
    Sample(sample::SampleArgs),
    /// MIL programs: check, format, run.
    #[command(subcommand)]
    Mil(mil_cmd::MilCommand),
    /// List the devices of this machine and their properties.
    Devices,
    /// Characterise a device: the ANE probe suite (JSON with --json).
    Probe(probe_cmd::ProbeArgs),
    /// (internal) the child process of the compile-limit probe.
    #[command(name = "__probe-child", hide = true)]
    ProbeChild(probe_cmd::ProbeChildArgs),
    /// Datasets: download TinyStories, pretokenize text into shards.
    #[command(subcommand)]
    Data(data_cmd::DataCommand),
    /// Tokenizers: train a BPE vocabulary.
    #[command(subcommand)]
    Tokenizer(data_cmd::TokenizerCommand),
    /// Read a Hugging Face model folder (config.json + safetensors) into a llama2.c model.bin.
    ImportHf(hf_cmd::ImportArgs),
    /// Generate text with a Hugging Face model folder (Llama or Qwen2) on a device.
    Generate(hf_cmd::GenerateArgs),
    /// Benchmarks that print figures measured in the same run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// A live terminal view of a training run: --follow FILE, or -- anetrain train ….
    Dashboard(dashboard_cmd::DashboardArgs),
    /// PNG charts of loss and ms/step from telemetry files.
    Plot(dashboard_cmd::PlotArgs),
    /// An OpenAI-compatible HTTP server (completions, chat, streaming, continuous batching).
    Serve(Box<serve::ServeArgs>),
}

/// An error the system, not the user, is responsible for: exit status 2.
#[derive(Debug)]
pub struct SystemError(pub String);

impl std::fmt::Display for SystemError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SystemError {}

/// Exit status for an error chain: 2 if anything in it says the system can't do this.
fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if cause.downcast_ref::<SystemError>().is_some() {
            return 2;
        }
        if let Some(d) = cause.downcast_ref::<device::Error>() {
            if d.kind == device::ErrorKind::Unavailable {
                return 2;
            }
        }
    }
    1
}

/// The error and its causes, joined by ": " as anyhow's `{:#}` does, less the causes that
/// an error's own message already ends with (errors that name their file also print its
/// I/O error, which is their source as well).
fn message(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.is_empty() {
            text = part;
        } else if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
    }
    text
}

/// True when the error is a closed stdout (`anetrain sample | head`): not an error.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

/// Loads model parameters from an anetrain checkpoint, a llama2.c model.bin (v0, v1) or
/// a Hugging Face model folder.
/// Refuses files larger than the memory available (they are read whole) and
/// non-finite weights (the llama2.c reader scans them itself).
pub fn load_model(path: &std::path::Path) -> anyhow::Result<llama::Params> {
    if path.is_dir() {
        // A Hugging Face folder (Llama, Mistral, Qwen2, Qwen3): config.json + safetensors.
        let model = llama::hf::read_model(path)?;
        model.params.check_finite().map_err(|e| e.in_file(path))?;
        return Ok(model.params);
    }
    if let Ok(meta) = std::fs::metadata(path) {
        device::memory::check(&format!("{}", path.display()), meta.len() as usize)?;
    }
    if train::trainer::is_checkpoint(path) {
        let params = train::trainer::load_params(path)?;
        params.check_finite().map_err(|e| e.in_file(path))?;
        Ok(params)
    } else {
        Ok(llama::llama2c::read_model(path)?)
    }
}

fn main() -> ExitCode {
    let parsed = Cli::command().try_get_matches().and_then(|m| Cli::from_arg_matches(&m).map(|cli| (cli, m)));
    let (cli, matches) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors; usage mistakes are the user's.
            return if e.use_stderr() { ExitCode::from(1) } else { ExitCode::SUCCESS };
        }
    };
    let result = match cli.command {
        Command::Devices => probe_cmd::devices(),
        Command::Probe(args) => match probe_cmd::probe(args) {
            Ok(code) => return code,
            Err(e) => Err(e),
        },
        Command::ProbeChild(args) => probe_cmd::probe_child(args),
        Command::Train(mut args) => {
            // A resumed run compares the flags given (not defaulted) with its checkpoint.
            args.given = matches.subcommand_matches("train").map(train_cmd::given_flags).unwrap_or_default();
            train_cmd::run(*args)
        }
        Command::Export(args) => train_cmd::export(args),
        Command::Sample(args) => sample::run(args),
        Command::Mil(cmd) => mil_cmd::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Data(cmd) => data_cmd::run(cmd),
        Command::Tokenizer(cmd) => data_cmd::run_tokenizer(cmd),
        Command::ImportHf(args) => hf_cmd::import(args),
        Command::Generate(args) => hf_cmd::generate(args),
        Command::Dashboard(args) => dashboard_cmd::dashboard(args),
        Command::Plot(args) => dashboard_cmd::plot(args),
        Command::Serve(args) => serve::run(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", message(&e));
            ExitCode::from(exit_code(&e))
        }
    }
}
