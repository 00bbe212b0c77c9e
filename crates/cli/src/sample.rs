//! `anetrain sample`: generate text from a model on a device, streaming to stdout.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use device::Precision;
use llama::{Sampler, Tokenizer};
use train::model::{generate, Decoder};

use crate::devices::{open_device, DeviceArg};

#[derive(Args, Debug)]
pub struct SampleArgs {
    /// A llama2.c model.bin (v0 or v1) or an anetrain checkpoint.
    #[arg(long)]
    pub model: PathBuf,
    /// llama2.c tokenizer.bin; default: tokenizer.bin beside the model.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// 0 is greedy.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f32,
    /// Seed of the sampler's random numbers; default: the current time, as llama2.c.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Positions to run, prompt included (llama2.c's -n); 0 or more than the model's
    /// context means the whole context.
    #[arg(long, default_value_t = 256)]
    pub steps: usize,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceArg,
    #[arg(long, default_value = "fp32")]
    pub precision: Precision,
    /// A PEFT LoRA adapter folder to apply (merged into the weights in memory, W + s·B·A).
    #[arg(long, value_name = "DIR")]
    pub lora: Option<PathBuf>,
}

/// The tokenizer for a model (the given file, or tokenizer.bin beside the model) and
/// the file it was read from.
pub fn find_tokenizer(model: &Path, given: Option<&Path>) -> Result<(Tokenizer, std::path::PathBuf)> {
    let path = match given {
        Some(p) => p.to_path_buf(),
        None => {
            let beside = model.with_file_name("tokenizer.bin");
            if !beside.exists() {
                bail!("no tokenizer given and none beside the model ({}): pass --tokenizer PATH", beside.display());
            }
            beside
        }
    };
    Ok((Tokenizer::read(&path)?, path))
}

/// Refuses a model whose decoder would not fit in memory: the KV cache is
/// `n_layers × kv_dim × 2·seq_len` values (f32 at most), sized by header fields.
fn check_decoder_memory(config: &llama::Config) -> Result<()> {
    let kv_dim = config.dim / config.n_heads * config.n_kv_heads;
    let what = format!(
        "the model's KV cache (header fields n_layers {}, seq_len {}, kv_dim {kv_dim})",
        config.n_layers, config.seq_len
    );
    let bytes = device::memory::bytes_of(&what, &[config.n_layers, kv_dim, 2, config.seq_len, 4])?;
    device::memory::check(&what, bytes)?;
    Ok(())
}

pub fn run(args: SampleArgs) -> Result<()> {
    if args.temperature.is_nan() || args.temperature < 0.0 {
        bail!("--temperature {} must be 0 (greedy) or positive", args.temperature);
    }
    if !(0.0..=1.0).contains(&args.top_p) {
        bail!("--top-p {} must be between 0 and 1", args.top_p);
    }
    let mut params = crate::load_model(&args.model)?;
    if let Some(dir) = &args.lora {
        crate::lora_cmd::read_adapter(dir, &params, "--lora")?.merge_into(&mut params);
    }
    let config = params.config().clone();
    let (tokenizer, tokenizer_path) = find_tokenizer(&args.model, args.tokenizer.as_deref())?;
    tokenizer
        .check_vocab(config.vocab_size)
        .with_context(|| format!("tokenizer {} for the model {}", tokenizer_path.display(), args.model.display()))?;
    check_decoder_memory(&config)?;
    let steps = if args.steps == 0 || args.steps > config.seq_len { config.seq_len } else { args.steps };
    let prompt = tokenizer.encode(&args.prompt, true, false);
    if prompt.len() > config.seq_len {
        bail!(
            "--prompt is {} tokens (with BOS), longer than the model's context of {} tokens",
            prompt.len(),
            config.seq_len
        );
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(1)
    });
    let mut sampler = Sampler::new(args.temperature, args.top_p, seed)?;
    let device = open_device(args.device, args.precision)?;
    let mut decoder = Decoder::new(device.as_ref(), &params)?;

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_error: Option<std::io::Error> = None;
    let (_, stats) = generate(
        &mut decoder,
        &prompt,
        steps,
        |logits| sampler.sample(logits),
        |prev, next| {
            if write_error.is_none() {
                let piece = llama::tokenizer::printable(tokenizer.decode(prev, next));
                if let Err(e) = out.write_all(piece).and_then(|_| out.flush()) {
                    write_error = Some(e);
                }
            }
        },
    )?;
    if let Some(e) = write_error {
        return Err(e.into());
    }
    writeln!(out)?;
    let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    eprintln!(
        "{} on {}: prefill {} tokens at {:.1} tokens/s, decode {} tokens at {:.1} tokens/s (compile {:.2} s)",
        args.model.display(),
        device.name(),
        stats.prefill_tokens,
        rate(stats.prefill_tokens, stats.prefill_seconds),
        stats.decode_tokens,
        rate(stats.decode_tokens, stats.decode_seconds),
        decoder.compile_seconds
    );
    Ok(())
}
