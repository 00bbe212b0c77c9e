//! `anetrain serve`: an OpenAI-compatible HTTP server (`/v1/completions`,
//! `/v1/chat/completions`, `/v1/models`, `/health`, `/metrics`) with streaming and
//! continuous batching.
//!
//! - [`api`]: routes, request checks, responses, Server-Sent Events (tokio + axum).
//! - [`engine`]: the thread that owns the model: bounded queue, continuous batching,
//!   chunked prefill, prompt-prefix cache, cancellation.
//! - [`batch`]: the batched forward pass (one GEMM per projection over every row).
//! - [`template`]: chat templates (minijinja).
//! - [`metrics`]: Prometheus text.
//! - [`bench`]: `anetrain bench serve`.

pub mod api;
pub mod batch;
pub mod bench;
pub mod engine;
pub mod metrics;
pub mod template;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use device::Precision;
use llama::tokenizers::AnyTokenizer;
use llama::Params;

use crate::devices::{open_device, DeviceArg};
use batch::BatchModel;
use engine::EngineConfig;
use metrics::Metrics;
use template::ChatTemplate;

/// Longest context the server allocates by default for a Hugging Face model (as
/// `generate`): the KV caches grow with the positions used, but prompts are checked
/// against it.
const DEFAULT_CONTEXT: usize = 2048;

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// A llama2.c model.bin, an anetrain checkpoint, or a Hugging Face folder (Llama or
    /// Qwen2: config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Tokenizer file (tokenizer.bin, tokenizer.model or tokenizer.json); default:
    /// tokenizer.bin beside a model file, the folder's tokenizer.json.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0: any free port (the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Where the model runs. `cpu`: the batched host forward pass. `ane` opens the
    /// Neural Engine (an error where there is none).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// A tokenizer_config.json whose `chat_template` formats chat prompts; default: the
    /// one beside the tokenizer or in the model folder, if any (else a plain
    /// `role: content` concatenation).
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// The name clients pass as `model`; default: the model's file or folder name.
    #[arg(long)]
    pub model_name: Option<String>,
    /// Context for a Hugging Face model (prompt + new tokens); default: its own, at most 2048.
    #[arg(long)]
    pub context: Option<usize>,
    /// Most sequences decoding together.
    #[arg(long, default_value_t = 32, value_parser = crate::bench::positive)]
    pub max_batch: usize,
    /// Most requests waiting for a place; more get 429.
    #[arg(long, default_value_t = 256)]
    pub queue: usize,
    /// Most prompt tokens prefilled per step (a longer prompt takes several steps, so
    /// it does not stall the sequences decoding meanwhile).
    #[arg(long, default_value_t = 64, value_parser = crate::bench::positive)]
    pub prefill_chunk: usize,
    /// Largest request body, in bytes (more gets 413).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// MiB of keys and values the prompt-prefix cache keeps.
    #[arg(long, default_value_t = 256)]
    pub prefix_cache_mib: usize,
    /// A PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors) to
    /// serve with the model: merged into the weights once at load (W + s·B·A), as
    /// `sample --lora` does; the batched engine then runs as without one.
    #[arg(long, value_name = "DIR")]
    pub lora: Option<PathBuf>,
    /// (testing) sleep this long after every batched step, so that tests can hold
    /// requests in flight (queue full, cancellation, draining) without a large model.
    #[arg(long, hide = true, default_value_t = 0)]
    pub debug_step_delay_ms: u64,
}

/// A model ready to serve.
pub struct Loaded {
    pub model: BatchModel,
    pub tokenizer: AnyTokenizer,
    pub stop_ids: Vec<u32>,
    pub template: Option<ChatTemplate>,
    pub name: String,
}

/// Loads the model, tokenizer and chat template `args` name.
pub fn load(args: &ServeArgs) -> Result<Loaded> {
    let (params, tokenizer, mut stop_ids, template_dir) = if args.model.is_dir() {
        let model = llama::hf::read_model(&args.model)?;
        let tokenizer_path = match &args.tokenizer {
            Some(p) => p.clone(),
            None => {
                let (json, bin) = (args.model.join("tokenizer.json"), args.model.join("tokenizer.bin"));
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
        tokenizer
            .check_model_vocab(model.params.config().vocab_size)
            .with_context(|| format!("{} for {}", tokenizer_path.display(), args.model.display()))?;
        let mut config = model.params.config().clone();
        let context = args.context.unwrap_or(config.seq_len.min(DEFAULT_CONTEXT));
        if context < 2 || context > config.seq_len {
            bail!("--context {context} must be between 2 and the model's max_position_embeddings {}", config.seq_len);
        }
        config.seq_len = context;
        let params = Params::from_vec(&config, model.params.into_vec())?;
        let stop = model.hf_config.eos_token_ids.clone();
        (params, tokenizer, stop, args.model.clone())
    } else {
        if args.context.is_some() {
            bail!("--context is for Hugging Face folders; a model.bin's context is its seq_len");
        }
        let params = crate::load_model(&args.model)?;
        let tokenizer = match &args.tokenizer {
            Some(p) => AnyTokenizer::open(p)?,
            None => AnyTokenizer::Llama2c(crate::sample::find_tokenizer(&args.model, None)?.0),
        };
        tokenizer
            .check_model_vocab(params.config().vocab_size)
            .with_context(|| format!("the tokenizer for {}", args.model.display()))?;
        // llama2.c stops when the model predicts BOS.
        let stop = tokenizer.bos_id().filter(|_| tokenizer.as_llama2c().is_some()).into_iter().collect();
        let dir = args.tokenizer.as_deref().unwrap_or(&args.model).parent().unwrap_or(Path::new(".")).to_path_buf();
        (params, tokenizer, stop, dir)
    };
    let mut params = params;
    if let Some(dir) = &args.lora {
        crate::lora_cmd::read_adapter(dir, &params, "--lora")?.merge_into(&mut params);
    }
    stop_ids.extend(tokenizer.eos_ids());
    stop_ids.sort_unstable();
    stop_ids.dedup();
    let template = match &args.chat_template {
        Some(p) => match ChatTemplate::from_tokenizer_config(p)? {
            Some(t) => Some(t),
            None => bail!("--chat-template {}: the file has no chat_template", p.display()),
        },
        None => {
            let beside = template_dir.join("tokenizer_config.json");
            if beside.is_file() {
                ChatTemplate::from_tokenizer_config(&beside)?
            } else {
                None
            }
        }
    };
    let name = match &args.model_name {
        Some(n) => n.clone(),
        None => args.model.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into()),
    };
    let model = BatchModel::new(params);
    Ok(Loaded { model, tokenizer, stop_ids, template, name })
}

/// A running server (engine thread and HTTP), for `serve` and in-process uses.
pub struct Server {
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Server {
    /// Stops accepting, lets requests in flight finish, stops the engine.
    pub fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => bail!("the server thread panicked"),
            None => Ok(()),
        }
    }
}

/// Starts a server for `loaded` on `addr` in its own threads.
pub fn spawn(loaded: Loaded, addr: SocketAddr, args: &ServeArgs) -> Result<Server> {
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let args = args.clone();
    let thread = std::thread::Builder::new().name("serve-http".into()).spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        runtime.block_on(serve_on(loaded, listener, &args, async {
            let _ = rx.await;
        }))
    })?;
    Ok(Server { addr, shutdown: Some(tx), thread: Some(thread) })
}

/// Serves until `shutdown` completes, then drains: requests in flight finish, the
/// engine finishes its sequences and stops.
async fn serve_on(
    loaded: Loaded,
    listener: std::net::TcpListener,
    args: &ServeArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let metrics = Arc::new(Metrics::new());
    let context = loaded.model.config().seq_len;
    let tokenizer = Arc::new(loaded.tokenizer);
    let config = EngineConfig {
        max_batch: args.max_batch,
        queue: args.queue,
        prefill_chunk: args.prefill_chunk,
        prefix_cache_bytes: args.prefix_cache_mib << 20,
        step_delay: std::time::Duration::from_millis(args.debug_step_delay_ms),
    };
    let (engine, engine_thread) =
        engine::start(Arc::new(loaded.model), tokenizer.clone(), loaded.stop_ids, config, metrics.clone());
    let state = Arc::new(api::AppState {
        engine,
        tokenizer,
        template: loaded.template,
        name: loaded.name,
        context,
        max_body: args.max_body_bytes,
        max_n: args.max_batch.min(8),
        metrics,
    });
    let app = api::router(state);
    let listener = tokio::net::TcpListener::from_std(listener)?;
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await.context("the HTTP server failed")?;
    // The router (and with it the engine's handle) is gone: the engine ends once its
    // sequences are done.
    tokio::task::spawn_blocking(move || engine_thread.join()).await.ok();
    Ok(())
}

/// `anetrain serve`.
pub fn run(args: ServeArgs) -> Result<()> {
    match args.device {
        DeviceArg::Cpu => {}
        DeviceArg::Ane | DeviceArg::Auto => {
            // The same device layer as `sample`: on a machine without an ANE this is
            // its clear error (exit 2).
            let device = open_device(args.device, Precision::Fp32)?;
            if device.name() != "cpu" {
                return Err(crate::SystemError(format!(
                    "serve runs its batched forward pass on the host CPU; batched decoding on the {} is not implemented yet: use --device cpu",
                    device.name()
                ))
                .into());
            }
        }
    }
    let start = std::time::Instant::now();
    let loaded = load(&args)?;
    let c = loaded.model.config().clone();
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .with_context(|| format!("--host {} --port {}: not an IP address and port", args.host, args.port))?;
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    eprintln!(
        "anetrain serve: {} ({} layers, dim {}, vocab {}, context {}; {}{}) loaded in {:.1} s",
        loaded.name,
        c.n_layers,
        c.dim,
        c.vocab_size,
        c.seq_len,
        loaded.tokenizer.kind(),
        if loaded.template.is_some() { ", chat template" } else { "" },
        start.elapsed().as_secs_f64()
    );
    eprintln!("listening on http://{addr} (Ctrl-C drains requests in flight, then exits)");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(serve_on(loaded, listener, &args, shutdown_signal()))?;
    eprintln!("anetrain serve: stopped");
    Ok(())
}

/// Ctrl-C, or SIGTERM on Unix.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("anetrain serve: draining requests in flight");
}
