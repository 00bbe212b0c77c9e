//! Hugging Face interop on the command line: `anetrain export MODEL --to-hf DIR`,
//! `anetrain import-hf DIR --to model.bin`, and `anetrain generate --model HF_DIR`
//! (Llama or Qwen2 folders, e.g. Qwen2.5-0.5B) on a device.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use device::Precision;
use llama::hf;
use llama::tokenizers::{self, AnyTokenizer, StreamDecoder};
use llama::{llama2c, Params, Sampler, Tokenizer};
use train::model::Decoder;

use crate::devices::{open_device, DeviceArg};

/// Longest context `generate` allocates by default. Qwen2.5 announces 32768 positions;
/// the decoder keeps a KV cache and an attention mask for every position it may reach,
/// so a smaller default keeps memory and compile time modest (`--context` raises it).
const DEFAULT_CONTEXT: usize = 2048;

// ---------------------------------------------------------------------------------------
// export --to-hf
// ---------------------------------------------------------------------------------------

/// Writes `params` as a Hugging Face folder: model.safetensors (fp32), config.json, and,
/// when a tokenizer.bin sits beside `model_path`, that file plus a tokenizer.json and
/// tokenizer_config.json made from it (so transformers' AutoTokenizer loads it).
pub fn export_hf(params: &Params, model_path: &Path, dir: &Path) -> Result<()> {
    let tokenizer_path = model_path.with_file_name("tokenizer.bin");
    let tokenizer = if tokenizer_path.is_file() {
        let t = Tokenizer::read(&tokenizer_path)?;
        t.check_vocab(params.config().vocab_size)
            .with_context(|| format!("{} beside {}", tokenizer_path.display(), model_path.display()))?;
        Some(t)
    } else {
        None
    };
    // llama2.c's ids: BOS 1, EOS 2 (a Qwen-style model imported earlier has no such convention).
    let (bos, eos): (Option<u32>, &[u32]) = if params.config().qkv_bias { (None, &[]) } else { (Some(1), &[2]) };
    hf::write_model(params, dir, hf::Dtype::F32, bos, eos)?;
    match &tokenizer {
        Some(t) => {
            std::fs::copy(&tokenizer_path, dir.join("tokenizer.bin"))
                .with_context(|| format!("copying {} into {}", tokenizer_path.display(), dir.display()))?;
            let json = tokenizers::tokenizer_json(t)?;
            write_json(&dir.join("tokenizer.json"), &json)?;
            write_json(
                &dir.join("tokenizer_config.json"),
                &tokenizers::tokenizer_config_json(params.config().seq_len),
            )?;
            eprintln!(
                "wrote {} (model.safetensors, config.json, tokenizer.json, tokenizer_config.json, tokenizer.bin)",
                dir.display()
            );
        }
        None => eprintln!(
            "wrote {} (model.safetensors, config.json); no tokenizer.bin beside {}, so no tokenizer files",
            dir.display(),
            model_path.display()
        ),
    }
    Ok(())
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialize");
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

// ---------------------------------------------------------------------------------------
// import-hf
// ---------------------------------------------------------------------------------------

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// A Hugging Face model folder (config.json + model.safetensors).
    pub dir: PathBuf,
    /// The llama2.c model.bin to write (a tokenizer.bin is written beside it when the
    /// folder has one, or a SentencePiece tokenizer.model to convert).
    #[arg(long)]
    pub to: PathBuf,
    /// llama2.c format version: 0 (legacy, what llama2.c's run reads) or 1.
    #[arg(long = "format-version", default_value_t = 0)]
    pub format_version: u8,
}

/// `anetrain import-hf DIR --to model.bin`.
pub fn import(args: ImportArgs) -> Result<()> {
    let version = match args.format_version {
        0 => llama2c::Version::V0,
        1 => llama2c::Version::V1,
        v => bail!("--format-version {v}: llama2.c formats are 0 and 1"),
    };
    let model = hf::read_model(&args.dir)?;
    if let Some(dir) = args.to.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    llama2c::write_model(&model.params, &args.to, version).with_context(|| {
        format!(
            "{} is a {} model; llama2.c's format holds Llama models only",
            args.dir.display(),
            model.hf_config.architecture.name()
        )
    })?;
    let dest = args.to.with_file_name("tokenizer.bin");
    let (bin, sp) = (args.dir.join("tokenizer.bin"), args.dir.join("tokenizer.model"));
    let tokenizer = if bin.is_file() {
        Some(Tokenizer::read(&bin)?)
    } else if sp.is_file() {
        Some(tokenizers::read_sentencepiece(&sp)?)
    } else {
        None
    };
    match tokenizer {
        Some(t) => {
            t.check_vocab(model.params.config().vocab_size).context("the folder's tokenizer")?;
            t.write(&dest)?;
            eprintln!("wrote {} and {} (llama2.c v{})", args.to.display(), dest.display(), args.format_version);
        }
        None => eprintln!(
            "wrote {} (llama2.c v{}); the folder has no tokenizer.bin or tokenizer.model to convert",
            args.to.display(),
            args.format_version
        ),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// generate
// ---------------------------------------------------------------------------------------

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A Hugging Face model folder: config.json (LlamaForCausalLM or Qwen2ForCausalLM),
    /// model.safetensors in fp32, fp16 or bf16, and tokenizer.json.
    #[arg(long)]
    pub model: PathBuf,
    /// Tokenizer file (tokenizer.json, tokenizer.model or tokenizer.bin); default: the
    /// folder's tokenizer.json.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// New tokens to generate at most (generation also stops at an end-of-text token).
    #[arg(long, default_value_t = 64)]
    pub steps: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f32,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Context to allocate (prompt + new tokens); default: the model's, at most 2048.
    #[arg(long)]
    pub context: Option<usize>,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceArg,
    #[arg(long, default_value = "fp32")]
    pub precision: Precision,
    /// Also print the token ids, prompt then generated, on one line of stderr (to
    /// compare with another implementation id by id).
    #[arg(long)]
    pub ids: bool,
    /// Write the logits at every prompt position, `[prompt tokens, vocab]` f32, to this
    /// .npy file, and stop (no generation): to compare with another implementation.
    #[arg(long, value_name = "FILE")]
    pub dump_logits: Option<PathBuf>,
    /// A PEFT LoRA adapter folder to apply (merged into the weights in memory, W + s·B·A).
    #[arg(long, value_name = "DIR")]
    pub lora: Option<PathBuf>,
}

/// `anetrain generate`: prefill the prompt, then decode one token at a time with the
/// KV cache, streaming text to stdout and timing both phases (stderr).
///
/// The transformer layers and the classifier run as MIL kernels on the device
/// ([`Decoder`]); the embedding lookup, norms and RoPE on the CPU. The classifier is the
/// one place where Qwen2.5 passes the ANE's per-dimension limit
/// ([`mil::lint::MAX_DIMENSION`] = 65536): its weight is `[151936, 896]`, so the decoder
/// splits its rows into three kernels ([`train::model::HEAD_PART_ROWS`] rows each at
/// most) and puts the logits together on the CPU.
pub fn generate(args: GenerateArgs) -> Result<()> {
    if args.temperature.is_nan() || args.temperature < 0.0 {
        bail!("--temperature {} must be 0 (greedy) or positive", args.temperature);
    }
    if !(0.0..=1.0).contains(&args.top_p) {
        bail!("--top-p {} must be between 0 and 1", args.top_p);
    }
    let load_start = Instant::now();
    let model = hf::read_model(&args.model)?;
    let tokenizer_path = match &args.tokenizer {
        Some(p) => p.clone(),
        None => {
            let json = args.model.join("tokenizer.json");
            let bin = args.model.join("tokenizer.bin");
            if json.is_file() {
                json
            } else if bin.is_file() {
                bin
            } else {
                bail!("no tokenizer.json in {}: pass --tokenizer PATH", args.model.display());
            }
        }
    };
    let tokenizer = AnyTokenizer::open(&tokenizer_path)?;
    let model_vocab = model.params.config().vocab_size;
    tokenizer
        .check_model_vocab(model_vocab)
        .with_context(|| format!("{} for {}", tokenizer_path.display(), args.model.display()))?;

    let prompt = tokenizer.encode_prompt(&args.prompt)?;
    let mut config = model.params.config().clone();
    let context = args.context.unwrap_or(config.seq_len.min(DEFAULT_CONTEXT));
    if context == 0 || context > config.seq_len {
        bail!("--context {context} must be between 1 and the model's max_position_embeddings {}", config.seq_len);
    }
    if prompt.len() >= context {
        bail!(
            "--prompt is {} tokens, which leaves no room in a context of {context} tokens (see --context)",
            prompt.len()
        );
    }
    config.seq_len = context;
    let mut params = Params::from_vec(&config, model.params.into_vec())?;
    if let Some(dir) = &args.lora {
        crate::lora_cmd::read_adapter(dir, &params, "--lora")?.merge_into(&mut params);
    }
    let mut stop: Vec<u32> = tokenizer.eos_ids();
    stop.extend(&model.hf_config.eos_token_ids);

    let device = open_device(args.device, args.precision)?;
    let mut decoder = Decoder::new(device.as_ref(), &params)?;
    let mut sampler = Sampler::new(args.temperature, args.top_p, args.seed)?;
    let usable_vocab = tokenizer.vocab_size();
    eprintln!(
        "{}: {} ({} layers, dim {}, {} heads / {} kv heads, vocab {}), {:?} weights, loaded in {:.1} s; {} on {}",
        args.model.display(),
        model.hf_config.architecture.name(),
        config.n_layers,
        config.dim,
        config.n_heads,
        config.n_kv_heads,
        config.vocab_size,
        model.dtype,
        load_start.elapsed().as_secs_f64(),
        tokenizer.kind(),
        device.name()
    );

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    out.write_all(tokenizer.decode(&prompt)?.as_bytes())?;
    out.flush()?;
    let mut stream = StreamDecoder::new(&tokenizer, &prompt)?;

    if let Some(path) = &args.dump_logits {
        if prompt.is_empty() {
            bail!("--dump-logits needs a prompt of at least one token");
        }
        let mut all = Vec::with_capacity(prompt.len() * config.vocab_size);
        for &token in &prompt {
            all.extend(decoder.forward(&[token])?);
        }
        crate::npy::write(path, mil::DType::Fp32, &[prompt.len(), config.vocab_size], &all)?;
        eprintln!("wrote the logits of {} positions to {}", prompt.len(), path.display());
        return Ok(());
    }

    // Kernels compile and pack their weights first (the prefill width, one token, the
    // classifier); compile time is reported on its own, not in the rates.
    decoder.prepare()?;
    let compile_before_prefill = decoder.compile_seconds;
    let start = Instant::now();
    let mut logits = decoder.forward(&prompt)?;
    let prefill_seconds = start.elapsed().as_secs_f64() - (decoder.compile_seconds - compile_before_prefill);
    let compile_before_decode = decoder.compile_seconds;
    let start = Instant::now();
    let (mut generated, mut decode_steps) = (0, 0);
    let mut all_ids = prompt.clone();
    let max_new = args.steps.min(context - prompt.len());
    while generated < max_new {
        // Embedding rows past the tokenizer's ids are padding (Qwen2.5): never sample them.
        logits[usable_vocab..].fill(f32::NEG_INFINITY);
        let next = sampler.sample(&logits);
        if stop.contains(&next) {
            break;
        }
        generated += 1;
        all_ids.push(next);
        out.write_all(stream.push(&tokenizer, next)?.as_bytes())?;
        out.flush()?;
        if generated == max_new {
            break;
        }
        logits = decoder.forward(&[next])?;
        decode_steps += 1;
    }
    let decode_seconds = start.elapsed().as_secs_f64() - (decoder.compile_seconds - compile_before_decode);
    out.write_all(stream.finish(&tokenizer)?.as_bytes())?;
    writeln!(out)?;
    if args.ids {
        let ids: Vec<String> = all_ids.iter().map(u32::to_string).collect();
        eprintln!("ids: {}", ids.join(" "));
    }
    let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    eprintln!(
        "prefill {} tokens at {:.1} tokens/s, decode {} tokens at {:.1} tokens/s (compile {:.2} s)",
        prompt.len(),
        rate(prompt.len(), prefill_seconds),
        decode_steps,
        rate(decode_steps, decode_seconds),
        decoder.compile_seconds
    );
    Ok(())
}
