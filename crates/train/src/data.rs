//! Training data: pretokenized shards, a held-out split, and seeded random windows.
//!
//! A shard is llama2.c's pretokenized format: a `.bin` file of little-endian `u16`
//! token ids, every story preceded by BOS (id 1), nothing else (no header). Shards are
//! memory-mapped, checked once when opened (odd length, empty, token ids beyond the
//! vocabulary — each error names the file and the offset), and then read in place.
//!
//! The validation split is chosen by [`HoldOut`]:
//! - [`HoldOut::Fraction`]`(f)`: the last `f` of *every* shard's tokens (so each shard
//!   contributes to both splits and no file has to be set aside);
//! - [`HoldOut::Shard`]`(path)`: a separate shard file is the validation split and the
//!   training shards are used whole (llama2.c sets its first shard aside this way).
//!
//! Training batches are windows of `seq + 1` consecutive tokens drawn uniformly over all
//! positions of the split (a window never straddles two shards or the split boundary);
//! the first `seq` tokens are the inputs and the last `seq` the targets. The draws come
//! from a [`Sampler`] — a ChaCha8 stream whose position is part of its [`SamplerState`] —
//! so a run resumed from a checkpoint draws exactly the windows it would have drawn.
//! For a deterministic validation loss, evaluate with a fresh `Sampler::new(seed)` each
//! time: the same windows every evaluation.
//!
//! ```
//! use train::data::{Dataset, Sampler};
//! let tokens: Vec<u16> = (0..100).map(|i| 1 + (i % 7) as u16).collect();
//! let data = Dataset::from_tokens("example", tokens, 8, 4).unwrap(); // vocab 8, seq 4
//! let mut sampler = Sampler::new(42);
//! let (mut inputs, mut targets) = ([0u32; 2 * 4], [0u32; 2 * 4]); // batch 2
//! data.sample_batch(&mut sampler, &mut inputs, &mut targets);
//! assert_eq!(inputs[1..4], targets[0..3]); // targets are inputs shifted by one
//! ```

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// The begin-of-sequence token llama2.c writes before every story.
pub const BOS: u16 = 1;

/// Bytes per token in a shard.
const TOKEN_BYTES: usize = 2;

/// A problem with training data, naming the file (or in-memory source) at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("no training shards were given")]
    NoShards,
    #[error("{source_name}: empty shard (no tokens)")]
    Empty { source_name: String },
    #[error("{source_name}: {bytes} bytes is an odd length; a shard holds 2-byte little-endian u16 tokens")]
    OddLength { source_name: String, bytes: u64 },
    #[error(
        "{source_name}: token id {token} at token offset {offset} (byte {}) is outside the vocabulary of {vocab} \
         (was the data tokenized with a different tokenizer?)",
        offset * 2
    )]
    TokenOutOfRange { source_name: String, offset: u64, token: u16, vocab: usize },
    #[error(
        "{split} split is too short: its longest stretch has {longest} tokens, but one window needs seq + 1 = {window} \
         (sources: {sources})"
    )]
    TooShort { split: Split, longest: usize, window: usize, sources: String },
    #[error("held-out fraction {0} must be at least 0 and below 1")]
    BadFraction(f64),
}

/// Which part of the data a [`Dataset`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Split {
    Train,
    Val,
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Val => "val",
        })
    }
}

/// How the validation split is taken (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub enum HoldOut {
    /// The last fraction (in `[0, 1)`) of every shard; 0 means no validation split.
    Fraction(f64),
    /// A separate shard file.
    Shard(PathBuf),
}

/// The tokens of one shard: mapped from a file, or held in memory.
enum Tokens {
    Mapped(Mmap),
    Owned(Vec<u16>),
}

/// One checked source of tokens.
struct Shard {
    /// The file's path, or the name given to in-memory tokens; used in messages.
    name: String,
    tokens: Tokens,
}

impl Shard {
    fn len(&self) -> usize {
        match &self.tokens {
            Tokens::Mapped(map) => map.len() / TOKEN_BYTES,
            Tokens::Owned(tokens) => tokens.len(),
        }
    }

    /// Token `i` widened to `u32`.
    #[inline]
    fn token(&self, i: usize) -> u32 {
        match &self.tokens {
            Tokens::Mapped(map) => u32::from(u16::from_le_bytes([map[TOKEN_BYTES * i], map[TOKEN_BYTES * i + 1]])),
            Tokens::Owned(tokens) => u32::from(tokens[i]),
        }
    }

    /// Maps a shard file and checks it.
    fn open(path: &Path, vocab_size: usize) -> Result<Shard, DataError> {
        let io_error = |source| DataError::Io { path: path.to_path_buf(), source };
        if path.is_dir() {
            // Mapping a directory fails with "No such device": say what it is instead.
            let why = "is a directory; give the token shards (*.bin) inside it, e.g. DIR/*.bin";
            return Err(io_error(std::io::Error::other(why)));
        }
        let file = File::open(path).map_err(io_error)?;
        let bytes = file.metadata().map_err(io_error)?.len();
        let name = path.display().to_string();
        if bytes == 0 {
            return Err(DataError::Empty { source_name: name });
        }
        if bytes % TOKEN_BYTES as u64 != 0 {
            return Err(DataError::OddLength { source_name: name, bytes });
        }
        // SAFETY: the map is read-only; as with every memory map, the file must not be
        // truncated by another process while training reads it.
        let map = unsafe { Mmap::map(&file) }.map_err(io_error)?;
        let shard = Shard { name, tokens: Tokens::Mapped(map) };
        shard.check_vocab(vocab_size)?;
        Ok(shard)
    }

    fn from_tokens(name: &str, tokens: Vec<u16>, vocab_size: usize) -> Result<Shard, DataError> {
        if tokens.is_empty() {
            return Err(DataError::Empty { source_name: name.to_string() });
        }
        let shard = Shard { name: name.to_string(), tokens: Tokens::Owned(tokens) };
        shard.check_vocab(vocab_size)?;
        Ok(shard)
    }

    /// Errors on the first token id `≥ vocab_size`.
    fn check_vocab(&self, vocab_size: usize) -> Result<(), DataError> {
        const SCAN_CHUNK: usize = 1 << 20;
        let n = self.len();
        let first_bad = (0..n.div_ceil(SCAN_CHUNK)).into_par_iter().find_map_first(|chunk| {
            (chunk * SCAN_CHUNK..((chunk + 1) * SCAN_CHUNK).min(n)).find(|&i| self.token(i) as usize >= vocab_size)
        });
        match first_bad {
            None => Ok(()),
            Some(offset) => Err(DataError::TokenOutOfRange {
                source_name: self.name.clone(),
                offset: offset as u64,
                token: self.token(offset) as u16,
                vocab: vocab_size,
            }),
        }
    }
}

/// A stretch `start..start + len` of one shard's tokens.
#[derive(Clone, Copy, Debug)]
struct Region {
    shard: usize,
    start: usize,
    len: usize,
}

/// Training and validation data, as opened by [`Dataset::open`].
#[derive(Debug)]
pub struct Splits {
    pub train: Dataset,
    /// `None` when the hold-out fraction is 0.
    pub val: Option<Dataset>,
}

/// One split of the data, from which windows of `seq + 1` tokens are drawn.
pub struct Dataset {
    split: Split,
    seq: usize,
    shards: Arc<[Shard]>,
    /// The regions with at least one window.
    regions: Vec<Region>,
    /// `window_ends[i]`: windows in regions `0..=i` (a prefix sum, for sampling).
    window_ends: Vec<u64>,
    n_tokens: usize,
}

impl fmt::Debug for Dataset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dataset")
            .field("split", &self.split)
            .field("seq", &self.seq)
            .field("n_tokens", &self.n_tokens)
            .field("regions", &self.regions)
            .finish()
    }
}

impl Dataset {
    /// Opens and checks the training shards (and a validation shard, if `hold_out` names
    /// one) for a model of `vocab_size` tokens trained on sequences of `seq`.
    pub fn open(paths: &[PathBuf], hold_out: &HoldOut, vocab_size: usize, seq: usize) -> Result<Splits, DataError> {
        if paths.is_empty() {
            return Err(DataError::NoShards);
        }
        let mut shards = Vec::with_capacity(paths.len() + 1);
        for path in paths {
            shards.push(Shard::open(path, vocab_size)?);
        }
        match hold_out {
            HoldOut::Fraction(fraction) => Dataset::split_by_fraction(shards, *fraction, seq),
            HoldOut::Shard(val_path) => {
                let n_train = shards.len();
                shards.push(Shard::open(val_path, vocab_size)?);
                let whole = |i: usize, shards: &[Shard]| Region { shard: i, start: 0, len: shards[i].len() };
                let train_regions: Vec<Region> = (0..n_train).map(|i| whole(i, &shards)).collect();
                let val_regions = vec![whole(n_train, &shards)];
                let shards: Arc<[Shard]> = shards.into();
                Ok(Splits {
                    train: Dataset::new(Split::Train, shards.clone(), train_regions, seq)?,
                    val: Some(Dataset::new(Split::Val, shards, val_regions, seq)?),
                })
            }
        }
    }

    /// In-memory tokens (checked like a shard) split as [`HoldOut::Fraction`] would:
    /// the last `val_fraction` is the validation split.
    pub fn split_tokens(
        name: &str,
        tokens: Vec<u16>,
        val_fraction: f64,
        vocab_size: usize,
        seq: usize,
    ) -> Result<Splits, DataError> {
        Dataset::split_by_fraction(vec![Shard::from_tokens(name, tokens, vocab_size)?], val_fraction, seq)
    }

    /// In-memory tokens, all of them training data.
    pub fn from_tokens(name: &str, tokens: Vec<u16>, vocab_size: usize, seq: usize) -> Result<Dataset, DataError> {
        let shard = Shard::from_tokens(name, tokens, vocab_size)?;
        let region = Region { shard: 0, start: 0, len: shard.len() };
        Dataset::new(Split::Train, vec![shard].into(), vec![region], seq)
    }

    fn split_by_fraction(shards: Vec<Shard>, fraction: f64, seq: usize) -> Result<Splits, DataError> {
        if !(0.0..1.0).contains(&fraction) {
            return Err(DataError::BadFraction(fraction));
        }
        let mut train_regions = Vec::with_capacity(shards.len());
        let mut val_regions = Vec::with_capacity(shards.len());
        for (i, shard) in shards.iter().enumerate() {
            let len = shard.len();
            let val_len = (len as f64 * fraction).round() as usize;
            train_regions.push(Region { shard: i, start: 0, len: len - val_len });
            val_regions.push(Region { shard: i, start: len - val_len, len: val_len });
        }
        let shards: Arc<[Shard]> = shards.into();
        let val = if fraction > 0.0 { Some(Dataset::new(Split::Val, shards.clone(), val_regions, seq)?) } else { None };
        Ok(Splits { train: Dataset::new(Split::Train, shards, train_regions, seq)?, val })
    }

    fn new(split: Split, shards: Arc<[Shard]>, regions: Vec<Region>, seq: usize) -> Result<Dataset, DataError> {
        let window = seq + 1;
        let n_tokens = regions.iter().map(|r| r.len).sum();
        let usable: Vec<Region> = regions.iter().copied().filter(|r| r.len >= window).collect();
        if seq == 0 || usable.is_empty() {
            let sources = regions.iter().map(|r| shards[r.shard].name.as_str()).collect::<Vec<_>>().join(", ");
            let longest = regions.iter().map(|r| r.len).max().unwrap_or(0);
            return Err(DataError::TooShort { split, longest, window, sources });
        }
        let mut window_ends = Vec::with_capacity(usable.len());
        let mut total = 0u64;
        for region in &usable {
            total += (region.len - window + 1) as u64;
            window_ends.push(total);
        }
        Ok(Dataset { split, seq, shards, regions: usable, window_ends, n_tokens })
    }

    pub fn split(&self) -> Split {
        self.split
    }

    /// Tokens per sequence; windows hold `seq + 1`.
    pub fn seq(&self) -> usize {
        self.seq
    }

    /// Tokens in this split (including stretches too short for a window).
    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    /// Distinct window start positions.
    pub fn n_windows(&self) -> u64 {
        self.window_ends.last().copied().unwrap_or(0)
    }

    /// Writes window number `index` (in `0..n_windows()`) into `window: [seq + 1]`.
    pub fn window(&self, index: u64, window: &mut [u32]) {
        assert_eq!(window.len(), self.seq + 1, "a window holds seq + 1 tokens");
        assert!(index < self.n_windows(), "window {index} of {}", self.n_windows());
        let (shard, start) = self.locate(index);
        for (i, token) in window.iter_mut().enumerate() {
            *token = shard.token(start + i);
        }
    }

    /// The shard and token offset where window `index` starts.
    fn locate(&self, index: u64) -> (&Shard, usize) {
        // The first region whose cumulative window count exceeds `index`.
        let region_idx = self.window_ends.partition_point(|&end| end <= index);
        let before = if region_idx == 0 { 0 } else { self.window_ends[region_idx - 1] };
        let region = self.regions[region_idx];
        (&self.shards[region.shard], region.start + (index - before) as usize)
    }

    /// Fills a batch of `batch = inputs.len() / seq` random windows, row-major
    /// `[batch, seq]` (the flattened `T = batch × seq` of the training step):
    /// `inputs[b·seq + s] = w_b[s]`, `targets[b·seq + s] = w_b[s + 1]`.
    ///
    /// # Panics
    /// If `inputs` and `targets` differ in length or are not a multiple of `seq`.
    pub fn sample_batch(&self, sampler: &mut Sampler, inputs: &mut [u32], targets: &mut [u32]) {
        let seq = self.seq;
        assert_eq!(inputs.len(), targets.len(), "inputs and targets must have the same length");
        assert!(inputs.len().is_multiple_of(seq), "batch length {} is not a multiple of seq {seq}", inputs.len());
        for (input_row, target_row) in inputs.chunks_exact_mut(seq).zip(targets.chunks_exact_mut(seq)) {
            let (shard, start) = self.locate(sampler.rng.gen_range(0..self.n_windows()));
            for s in 0..seq {
                input_row[s] = shard.token(start + s);
                target_row[s] = shard.token(start + s + 1);
            }
        }
    }
}

impl Dataset {
    /// Draws the windows of a batch of `batch` sequences without reading them: the
    /// sampler ends where [`Dataset::sample_batch`] would have left it. (A data-parallel
    /// rank skips the other ranks' micro-batches of a step this way, so every rank and
    /// every rank count walk the same stream; [`crate::distributed`].)
    pub fn skip_batch(&self, sampler: &mut Sampler, batch: usize) {
        for _ in 0..batch {
            sampler.rng.gen_range(0..self.n_windows());
        }
    }
}

/// The random stream that picks windows: ChaCha8, reproducible from its state.
#[derive(Clone, Debug)]
pub struct Sampler {
    seed: u64,
    rng: ChaCha8Rng,
}

/// Everything needed to resume a [`Sampler`] exactly: its seed and how far it has read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    pub seed: u64,
    /// Position in the ChaCha stream, in 32-bit words.
    pub word_pos: u128,
}

impl Sampler {
    pub fn new(seed: u64) -> Sampler {
        Sampler { seed, rng: ChaCha8Rng::seed_from_u64(seed) }
    }

    /// The state to save in a checkpoint.
    pub fn state(&self) -> SamplerState {
        SamplerState { seed: self.seed, word_pos: self.rng.get_word_pos() }
    }

    /// A sampler that continues exactly where the one that produced `state` was.
    pub fn restore(state: SamplerState) -> Sampler {
        let mut sampler = Sampler::new(state.seed);
        sampler.rng.set_word_pos(state.word_pos);
        sampler
    }
}

/// Writes `tokens` as a shard file (little-endian u16, no header).
pub fn write_shard(path: &Path, tokens: &[u16]) -> Result<(), DataError> {
    let io_error = |source| DataError::Io { path: path.to_path_buf(), source };
    let mut bytes = Vec::with_capacity(tokens.len() * TOKEN_BYTES);
    for token in tokens {
        bytes.extend_from_slice(&token.to_le_bytes());
    }
    let mut file = File::create(path).map_err(io_error)?;
    file.write_all(&bytes).map_err(io_error)?;
    file.flush().map_err(io_error)
}
