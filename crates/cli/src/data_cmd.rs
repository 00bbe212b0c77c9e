//! Data and tokenizers on the command line: `anetrain data download tinystories`,
//! `anetrain data pretokenize`, `anetrain data chat`, and `anetrain tokenizer train`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use llama::chat::ChatTemplate;
use llama::tokenizers::AnyTokenizer;
use train::chat_data::{self, ChatFormat};
use train::data::TokenWidth;
use train::{download, pretokenize};

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Download a dataset archive (resumable) and unpack it.
    Download(DownloadArgs),
    /// Encode JSON (TinyStories) or text files into token shards for `train --data`.
    Pretokenize(PretokenizeArgs),
    /// Render chat JSONL with the model's chat template into masked shards (the loss
    /// counts the assistant's tokens only) for `train --data` and `lora --data`.
    Chat(ChatArgs),
}

#[derive(Args, Debug)]
pub struct ChatArgs {
    /// A Hugging Face model folder (its tokenizer.json and tokenizer_config.json), a
    /// tokenizer.json (the chat template is read from the tokenizer_config.json beside
    /// it), or a llama2.c tokenizer.bin / SentencePiece .model (no template).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// JSONL inputs: one {"messages": [{"role": …, "content": …}, …]} per line.
    #[arg(long = "in", required = true, num_args = 1..)]
    pub inputs: Vec<PathBuf>,
    /// Output folder; each input becomes OUT/<input stem>.bin (a masked shard).
    #[arg(long)]
    pub out: PathBuf,
    /// A tokenizer_config.json whose chat_template to use instead of the one found
    /// with the tokenizer.
    #[arg(long, conflicts_with = "plain")]
    pub chat_template: Option<PathBuf>,
    /// Ignore any chat template: plain `role: content` lines (as `serve` prompts
    /// models without a template).
    #[arg(long)]
    pub plain: bool,
    /// Token width (default: u16 up to 65 536 ids, else u32).
    #[arg(long, value_enum)]
    pub width: Option<WidthArg>,
    /// Worker threads (default: one per core). The output is the same for any number.
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Subcommand, Debug)]
pub enum TokenizerCommand {
    /// Train a BPE vocabulary (llama2.c tokenizer.bin, byte fallback) on text files.
    Train(TokenizerTrainArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DatasetName {
    /// roneneldan/TinyStories: TinyStories_all_data.tar.gz, 50 JSON shards (≈1.5 GB).
    Tinystories,
}

#[derive(Args, Debug)]
pub struct DownloadArgs {
    pub dataset: DatasetName,
    /// Folder for the archive and the unpacked files.
    #[arg(long, default_value = "data")]
    pub dir: PathBuf,
    /// Where to download from; default: the public archive on the Hugging Face Hub.
    #[arg(long)]
    pub url: Option<String>,
    /// Expected sha256 of the archive (64 hex digits); checked before unpacking.
    #[arg(long)]
    pub sha256: Option<String>,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct PretokenizeArgs {
    /// tokenizer.bin (llama2.c), *.model (SentencePiece) or tokenizer.json (Hugging Face).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Inputs: *.json (arrays of objects with a "story" field, as TinyStories) or text
    /// files with one story per blank-line-separated block.
    #[arg(long = "in", required = true, num_args = 1..)]
    pub inputs: Vec<PathBuf>,
    /// Output folder; each input becomes OUT/<input stem>.bin.
    #[arg(long)]
    pub out: PathBuf,
    /// Token width of the shards: u16 (llama2.c's headerless files) or u32 (headed).
    /// Default: u16 when the vocabulary has at most 65 536 ids, else u32.
    #[arg(long, value_enum)]
    pub width: Option<WidthArg>,
    /// Worker threads (default: one per core). The output is the same for any number.
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WidthArg {
    U16,
    U32,
}

impl From<WidthArg> for TokenWidth {
    fn from(w: WidthArg) -> TokenWidth {
        match w {
            WidthArg::U16 => TokenWidth::U16,
            WidthArg::U32 => TokenWidth::U32,
        }
    }
}

#[derive(Args, Debug)]
pub struct TokenizerTrainArgs {
    /// Vocabulary size, special and byte pieces included (more than 259).
    #[arg(long, default_value_t = train::bpe::DEFAULT_VOCAB_SIZE)]
    pub vocab: usize,
    /// Training text: *.json (TinyStories) or text files (blank-line-separated stories).
    #[arg(long = "in", required = true, num_args = 1..)]
    pub inputs: Vec<PathBuf>,
    /// The tokenizer.bin to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace --out if it exists (without it, an existing file is refused).
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Download(args) => download_cmd(args),
        DataCommand::Pretokenize(args) => pretokenize_cmd(args),
        DataCommand::Chat(args) => chat_cmd(args),
    }
}

pub fn run_tokenizer(cmd: TokenizerCommand) -> Result<()> {
    match cmd {
        TokenizerCommand::Train(args) => train_tokenizer(args),
    }
}

fn bar(quiet: bool, template: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    bar.set_style(ProgressStyle::with_template(template).expect("the template is valid").progress_chars("█▉▊▋▌▍▎▏ "));
    bar
}

fn download_cmd(args: DownloadArgs) -> Result<()> {
    let DatasetName::Tinystories = args.dataset;
    let url = args.url.as_deref().unwrap_or(download::TINYSTORIES_URL);
    let archive = args.dir.join("TinyStories_all_data.tar.gz");
    let progress = bar(args.quiet, "{bytes:>10}/{total_bytes}  {wide_bar}  {bytes_per_sec}  ETA {eta}");
    let fetched = download::fetch(url, &archive, args.sha256.as_deref(), &progress);
    progress.finish_and_clear();
    let fetched = fetched?;
    if fetched.already_complete {
        eprintln!("{} is already complete ({} bytes)", archive.display(), fetched.bytes);
    } else {
        let resumed = if fetched.resumed_from > 0 {
            format!(", resumed at byte {}", fetched.resumed_from)
        } else {
            String::new()
        };
        eprintln!("downloaded {} ({} bytes{resumed})", archive.display(), fetched.bytes);
    }
    if args.sha256.is_none() {
        eprintln!("sha256 {} (pass --sha256 to check it next time)", fetched.sha256);
    }
    let out = args.dir.join("TinyStories_all_data");
    let progress = bar(args.quiet, "unpacking {pos} files  {spinner}");
    let files = download::unpack_tar_gz(&archive, &out, &progress);
    progress.finish_and_clear();
    match files? {
        0 => eprintln!("{} already unpacked", out.display()),
        n => eprintln!("unpacked {n} files into {}", out.display()),
    }
    Ok(())
}

fn pretokenize_cmd(args: PretokenizeArgs) -> Result<()> {
    let tokenizer = AnyTokenizer::open(&args.tokenizer)?;
    pretokenize::check_tokenizer(&tokenizer).with_context(|| format!("--tokenizer {}", args.tokenizer.display()))?;
    let width = pretokenize::shard_width(&tokenizer, args.width.map(TokenWidth::from))
        .with_context(|| format!("--width u16 with --tokenizer {}", args.tokenizer.display()))?;
    let threads = args.threads.unwrap_or(0);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().context("cannot start worker threads")?;
    let progress = bar(args.quiet, "{pos:>9}/{len} stories  {wide_bar}  {per_sec}  ETA {eta}");
    let start = std::time::Instant::now();
    let result =
        pool.install(|| pretokenize::pretokenize_files(&tokenizer, &args.inputs, &args.out, Some(width), &progress));
    progress.finish_and_clear();
    let summaries = result?;
    let (stories, tokens): (usize, usize) = summaries.iter().fold((0, 0), |(s, t), x| (s + x.stories, t + x.tokens));
    for s in &summaries {
        eprintln!("{} → {}: {} stories, {} tokens", s.input.display(), s.output.display(), s.stories, s.tokens);
    }
    eprintln!(
        "{stories} stories, {tokens} {width} tokens with {} ({} ids) in {:.1} s on {} threads",
        tokenizer.kind(),
        tokenizer.vocab_size(),
        start.elapsed().as_secs_f64(),
        pool.current_num_threads()
    );
    Ok(())
}

fn chat_cmd(args: ChatArgs) -> Result<()> {
    let tokenizer = AnyTokenizer::open(&args.tokenizer)?;
    let width = pretokenize::shard_width(&tokenizer, args.width.map(TokenWidth::from))
        .with_context(|| format!("--width u16 with --tokenizer {}", args.tokenizer.display()))?;
    let config_path = match &args.chat_template {
        Some(path) => Some(path.clone()),
        None if args.plain => None,
        None => {
            let dir = if args.tokenizer.is_dir() {
                args.tokenizer.clone()
            } else {
                args.tokenizer.parent().map(PathBuf::from).unwrap_or_default()
            };
            Some(dir.join("tokenizer_config.json")).filter(|p| p.is_file())
        }
    };
    let format = match &config_path {
        Some(path) => match ChatTemplate::from_tokenizer_config(path)? {
            Some(template) => {
                eprintln!("chat template: {}", path.display());
                ChatFormat::Template(Box::new(template))
            }
            None if args.chat_template.is_some() => {
                bail!("--chat-template {}: the file has no chat_template", path.display())
            }
            None => ChatFormat::Plain,
        },
        None => ChatFormat::Plain,
    };
    if matches!(format, ChatFormat::Plain) {
        eprintln!("no chat template: plain `role: content` lines, BOS first, EOS after a final assistant reply");
    }
    let threads = args.threads.unwrap_or(0);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().context("cannot start worker threads")?;
    let start = std::time::Instant::now();
    let summaries = pool.install(|| chat_data::chat_files(&tokenizer, &format, &args.inputs, &args.out, width))?;
    for s in &summaries {
        eprintln!(
            "{} → {}: {} conversations, {} tokens, {} of them the assistant's (the loss counts those)",
            s.input.display(),
            s.output.display(),
            s.conversations,
            s.tokens,
            s.loss_tokens
        );
    }
    eprintln!("{width} tokens with {} in {:.1} s", tokenizer.kind(), start.elapsed().as_secs_f64());
    Ok(())
}

fn train_tokenizer(args: TokenizerTrainArgs) -> Result<()> {
    // Checked before the (long) training, as pretokenize checks its output.
    if args.out.is_dir() {
        bail!("--out {} is a directory; give the tokenizer.bin file to write", args.out.display());
    }
    if args.out.exists() && !args.overwrite {
        bail!("--out {} already exists: pass --overwrite to replace it, or choose another path", args.out.display());
    }
    let mut texts = Vec::new();
    for input in &args.inputs {
        texts.extend(pretokenize::read_stories(input)?);
    }
    if texts.is_empty() {
        bail!("no text in {} input file(s)", args.inputs.len());
    }
    let start = std::time::Instant::now();
    let tokenizer = train::bpe::train_tokenizer(&texts, args.vocab)?;
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    tokenizer.write(&args.out)?;
    eprintln!(
        "wrote {}: {} pieces from {} stories in {:.1} s{}",
        args.out.display(),
        tokenizer.vocab_size(),
        texts.len(),
        start.elapsed().as_secs_f64(),
        if tokenizer.vocab_size() < args.vocab { " (the text ran out of pairs to merge)" } else { "" }
    );
    Ok(())
}
