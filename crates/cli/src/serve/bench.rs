//! `anetrain bench serve`: the server in this process on a loopback port, driven over
//! HTTP by streaming clients — first one client alone, then N at once — printing
//! aggregate tokens/s, time to first token and inter-token latency (p50/p99) of
//! both runs, and the ratio of their throughputs.

use std::io::BufRead;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use llama::tokenizers::AnyTokenizer;
use llama::Tokenizer;

use super::{batch::BatchModel, Loaded, ServeArgs};

#[derive(Args, Debug)]
pub struct ServeBench {
    /// Concurrent clients of the batched run.
    #[arg(long, default_value_t = 16, value_parser = crate::bench::positive)]
    pub clients: usize,
    /// Requests of the batched run, shared among its clients (the one-client run makes
    /// requests / clients of them, at least 2).
    #[arg(long, default_value_t = 32, value_parser = crate::bench::positive)]
    pub requests: usize,
    /// A model file or folder (as `serve --model`), or a preset (stories15m, …) with
    /// random weights and a made-up vocabulary.
    #[arg(long, default_value = "stories15m")]
    pub model: String,
    #[arg(long)]
    pub tokenizer: Option<std::path::PathBuf>,
    /// New tokens per request (end-of-text ignored, so every request makes as many).
    #[arg(long, default_value_t = 128, value_parser = crate::bench::positive)]
    pub max_tokens: usize,
    #[arg(long, default_value = "Once upon a time")]
    pub prompt: String,
}

/// What one streamed request saw.
struct Sample {
    tokens: usize,
    ttft: f64,
    gaps: Vec<f64>,
}

struct Run {
    clients: usize,
    requests: usize,
    tokens: usize,
    seconds: f64,
    ttft: Vec<f64>,
    itl: Vec<f64>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.tokens as f64 / self.seconds
    }
}

fn serve_args(spec: &str, tokenizer: Option<std::path::PathBuf>, clients: usize) -> ServeArgs {
    ServeArgs {
        model: spec.into(),
        tokenizer,
        host: "127.0.0.1".into(),
        port: 0,
        device: crate::devices::DeviceArg::Cpu,
        chat_template: None,
        model_name: Some("bench".into()),
        context: None,
        max_batch: clients.max(1),
        queue: 4096,
        prefill_chunk: 64,
        max_body_bytes: 1 << 20,
        prefix_cache_mib: 256,
        lora: None,
        debug_step_delay_ms: 0,
    }
}

/// A vocabulary for a random model: llama2.c's specials, the 256 byte pieces, then
/// made-up words.
fn made_up_tokenizer(vocab: usize) -> Result<Tokenizer> {
    let mut pieces: Vec<String> = vec!["<unk>".into(), "\n<s>\n".into(), "\n</s>\n".into()];
    pieces.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    let mut i = 0;
    while pieces.len() < vocab {
        pieces.push(format!(" w{i}"));
        i += 1;
    }
    pieces.truncate(vocab);
    let scores = vec![0.0; pieces.len()];
    Ok(Tokenizer::new(pieces, scores)?)
}

pub fn run(args: ServeBench) -> Result<()> {
    let loaded = match llama::Config::preset(&args.model) {
        Some(config) => {
            let params = llama::Params::init(&config, 0)?;
            let tokenizer = match &args.tokenizer {
                Some(p) => AnyTokenizer::open(p)?,
                None => AnyTokenizer::Llama2c(made_up_tokenizer(config.vocab_size)?),
            };
            Loaded {
                model: BatchModel::new(params),
                tokenizer,
                stop_ids: vec![1, 2],
                template: None,
                name: "bench".into(),
            }
        }
        None if std::path::Path::new(&args.model).exists() => {
            super::load(&serve_args(&args.model, args.tokenizer.clone(), args.clients))?
        }
        None => {
            bail!("--model `{}` is neither a preset ({}) nor a file", args.model, llama::config::PRESETS.join(", "))
        }
    };
    let c = loaded.model.config().clone();
    println!(
        "bench serve: {} ({} layers, dim {}, hidden {}, vocab {}), {} new tokens per request, prompt {:?}, {} threads",
        args.model,
        c.n_layers,
        c.dim,
        c.hidden_dim,
        c.vocab_size,
        args.max_tokens,
        args.prompt,
        rayon::current_num_threads()
    );
    let server = super::spawn(loaded, "127.0.0.1:0".parse()?, &serve_args(&args.model, None, args.clients))?;
    let url = format!("http://{}/v1/completions", server.addr);
    let body = serde_json::json!({
        "model": "bench", "prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0,
        "stream": true, "stream_options": {"include_usage": true}, "ignore_eos": true,
    })
    .to_string();
    // Warm-up: weights into the caches, threads started.
    one_request(&url, &body).context("the warm-up request")?;
    let single = drive(&url, &body, 1, (args.requests / args.clients).max(2))?;
    let batched = drive(&url, &body, args.clients, args.requests)?;
    server.stop()?;

    println!(
        "{:>8} {:>9} {:>8} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "clients", "requests", "tokens", "wall s", "tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99"
    );
    for r in [&single, &batched] {
        println!(
            "{:>8} {:>9} {:>8} {:>8.2} {:>10.1} {:>8.1}ms {:>8.1}ms {:>8.2}ms {:>8.2}ms",
            r.clients,
            r.requests,
            r.tokens,
            r.seconds,
            r.rate(),
            percentile(&r.ttft, 0.5) * 1e3,
            percentile(&r.ttft, 0.99) * 1e3,
            percentile(&r.itl, 0.5) * 1e3,
            percentile(&r.itl, 0.99) * 1e3
        );
    }
    println!(
        "aggregate throughput, {} clients / 1 client: {:.2}x ({:.1} / {:.1} tok/s)",
        args.clients,
        batched.rate() / single.rate(),
        batched.rate(),
        single.rate()
    );
    Ok(())
}

/// `requests` requests from `clients` threads, each taking the next until none is left.
fn drive(url: &str, body: &str, clients: usize, requests: usize) -> Result<Run> {
    let next = AtomicUsize::new(0);
    let samples = Mutex::new(Vec::new());
    let errors = Mutex::new(Vec::new());
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..clients {
            scope.spawn(|| {
                while next.fetch_add(1, Ordering::SeqCst) < requests {
                    match one_request(url, body) {
                        Ok(s) => samples.lock().unwrap_or_else(|p| p.into_inner()).push(s),
                        Err(e) => errors.lock().unwrap_or_else(|p| p.into_inner()).push(format!("{e:#}")),
                    }
                }
            });
        }
    });
    let seconds = start.elapsed().as_secs_f64();
    if let Some(e) = errors.into_inner().unwrap_or_else(|p| p.into_inner()).first() {
        bail!("a benchmark request failed: {e}");
    }
    let samples = samples.into_inner().unwrap_or_else(|p| p.into_inner());
    Ok(Run {
        clients,
        requests,
        tokens: samples.iter().map(|s| s.tokens).sum(),
        seconds,
        ttft: samples.iter().map(|s| s.ttft).collect(),
        itl: samples.iter().flat_map(|s| s.gaps.iter().copied()).collect(),
    })
}

/// One streamed completion: the arrival time of every chunk that carries text.
fn one_request(url: &str, body: &str) -> Result<Sample> {
    let agent = ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(10)).build();
    let start = Instant::now();
    let response = agent.post(url).set("Content-Type", "application/json").send_string(body)?;
    let reader = std::io::BufReader::new(response.into_reader());
    let (mut first, mut last, mut gaps, mut tokens) = (None, None, Vec::new(), 0);
    for line in reader.lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            break;
        }
        let now = Instant::now();
        let chunk: serde_json::Value = serde_json::from_str(data)?;
        if let Some(u) = chunk.get("usage").and_then(|u| u.get("completion_tokens")).and_then(|t| t.as_u64()) {
            tokens = u as usize;
        }
        let has_text = chunk["choices"].get(0).and_then(|c| c["text"].as_str()).is_some_and(|t| !t.is_empty());
        if has_text {
            match last {
                None => first = Some(now.duration_since(start).as_secs_f64()),
                Some(t) => gaps.push(now.duration_since(t).as_secs_f64()),
            }
            last = Some(now);
        }
    }
    Ok(Sample { tokens, ttft: first.unwrap_or(0.0), gaps })
}

fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}
