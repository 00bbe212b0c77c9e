//! Training data: pretokenized shards, a held-out split, and seeded random windows.
//!
//! A shard is a `.bin` file of little-endian token ids, every document preceded by its
//! BOS token, in one of two layouts told apart by the file's first 8 bytes:
//! - **llama2.c's** (no header): `u16` ids and nothing else. Written for vocabularies
//!   of at most 65 536 ids and no loss mask, so llama2.c reads what `pretokenize` writes.
//! - **headed** ([`SHARD_MAGIC`] `ANETOKNS`): a 32-byte header — magic, format version
//!   (u32, 1), bytes per token (u32, 2 or 4), flags (u32, bit 0: a loss mask follows),
//!   a reserved u32 (0), the token count `n` (u64) — then `n` ids of that width, then,
//!   with the mask flag, `n` bytes of 0 or 1. Written for vocabularies beyond u16 (Qwen's
//!   151 936) and for chat data ([`crate::chat_data`]), whose mask marks the assistant's
//!   tokens. (A llama2.c shard cannot start with the magic by accident: its first token
//!   is BOS, and `AN` would be id 20033.)
//!
//! Shards are memory-mapped, checked once when opened (length against the header, odd
//! length, empty, token ids beyond the vocabulary, mask bytes other than 0/1 — each
//! error names the file and the offset), and then read in place.
//!
//! **Loss mask.** A mask byte belongs to its token: 1 means "this token is a target the
//! loss counts" (an assistant token of a chat), 0 means "context only". A window's
//! target `s` is token `start + s + 1`, so it takes that token's mask; a masked target is
//! written as [`IGNORE_TARGET`], which the cross-entropy skips (no loss, no gradient)
//! and leaves out of the mean. Packing windows over concatenated documents keeps this
//! exact: masks move with their tokens, and a document's first token (its BOS) is never
//! a loss token, so no counted target asks the model to predict across a document
//! boundary. Shards without a mask count every target.
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

/// A target the loss skips: masked out (context, not a loss token). Every cross-entropy
/// of the training pipelines ([`crate::cpu_ops`]) gives it no loss and no gradient, and
/// takes the mean over the other targets.
pub const IGNORE_TARGET: u32 = u32::MAX;

/// The first 8 bytes of a headed shard (see the module docs).
pub const SHARD_MAGIC: &[u8; 8] = b"ANETOKNS";
/// The headed shard format's version.
const SHARD_VERSION: u32 = 1;
/// Bytes of a headed shard's header.
const HEADER_BYTES: usize = 32;
/// Header flag: a loss mask follows the tokens.
const FLAG_MASK: u32 = 1;

/// Bytes per token id in a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenWidth {
    U16,
    U32,
}

impl TokenWidth {
    /// The narrowest width that holds every id of a `vocab_size`-token vocabulary.
    pub fn for_vocab(vocab_size: usize) -> TokenWidth {
        if vocab_size <= 1 << 16 {
            TokenWidth::U16
        } else {
            TokenWidth::U32
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            TokenWidth::U16 => 2,
            TokenWidth::U32 => 4,
        }
    }

    /// Largest vocabulary this width holds.
    pub fn max_vocab(self) -> usize {
        match self {
            TokenWidth::U16 => 1 << 16,
            TokenWidth::U32 => 1 << 32,
        }
    }
}

impl fmt::Display for TokenWidth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenWidth::U16 => "u16",
            TokenWidth::U32 => "u32",
        })
    }
}

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
        "{source_name}: token id {token} at token offset {offset} (byte {byte}) is outside the vocabulary of {vocab} \
         (was the data tokenized with a different tokenizer?)"
    )]
    TokenOutOfRange { source_name: String, offset: u64, byte: u64, token: u32, vocab: usize },
    #[error("{source_name}: {message}")]
    BadHeader { source_name: String, message: String },
    #[error("{source_name}: loss-mask byte {value} at token offset {offset} (byte {byte}) is not 0 or 1")]
    BadMask { source_name: String, offset: u64, byte: u64, value: u8 },
    #[error("{source_name}: a loss mask must have one byte per token: {tokens} tokens, {mask} mask bytes")]
    MaskLength { source_name: String, tokens: usize, mask: usize },
    #[error("{source_name}: token id {token} at offset {offset} does not fit a {width} shard (vocabulary up to {})", width.max_vocab())]
    TooWide { source_name: String, offset: usize, token: u32, width: TokenWidth },
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

/// A shard's bytes: mapped from a file, or held in memory (in the same layout).
enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(map) => map,
            Bytes::Owned(bytes) => bytes,
        }
    }
}

/// Where a shard's tokens and mask are in its bytes.
#[derive(Clone, Copy, Debug)]
struct Layout {
    /// Byte offset of token 0.
    tokens_at: usize,
    width: TokenWidth,
    n_tokens: usize,
    /// Byte offset of the loss mask (one byte per token), if there is one.
    mask_at: Option<usize>,
}

impl Layout {
    /// Reads the layout of a shard's bytes (headed or llama2.c's); errors name `name`.
    fn parse(name: &str, bytes: &[u8]) -> Result<Layout, DataError> {
        let bad = |message: String| DataError::BadHeader { source_name: name.to_string(), message };
        if bytes.is_empty() {
            return Err(DataError::Empty { source_name: name.to_string() });
        }
        if !bytes.starts_with(SHARD_MAGIC) {
            if !bytes.len().is_multiple_of(2) {
                return Err(DataError::OddLength { source_name: name.to_string(), bytes: bytes.len() as u64 });
            }
            return Ok(Layout { tokens_at: 0, width: TokenWidth::U16, n_tokens: bytes.len() / 2, mask_at: None });
        }
        if bytes.len() < HEADER_BYTES {
            return Err(bad(format!(
                "starts with the shard magic {:?} but is only {} bytes, shorter than its {HEADER_BYTES}-byte header",
                String::from_utf8_lossy(SHARD_MAGIC),
                bytes.len()
            )));
        }
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        let (version, width, flags, reserved) = (u32_at(8), u32_at(12), u32_at(16), u32_at(20));
        let n_tokens = u64::from_le_bytes(bytes[24..32].try_into().expect("8 bytes"));
        if version != SHARD_VERSION {
            return Err(bad(format!("shard format version {version}; this build reads version {SHARD_VERSION}")));
        }
        let width = match width {
            2 => TokenWidth::U16,
            4 => TokenWidth::U32,
            other => return Err(bad(format!("header says {other} bytes per token; a shard has 2 (u16) or 4 (u32)"))),
        };
        if flags & !FLAG_MASK != 0 || reserved != 0 {
            return Err(bad(format!(
                "unknown header flags {flags:#x} / reserved {reserved:#x} (written by a newer version?)"
            )));
        }
        let masked = flags & FLAG_MASK != 0;
        let per_token = width.bytes() as u64 + u64::from(masked);
        let expected = n_tokens.checked_mul(per_token).and_then(|b| b.checked_add(HEADER_BYTES as u64));
        if expected != Some(bytes.len() as u64) {
            return Err(bad(format!(
                "header says {n_tokens} {width} tokens{}, which is {} bytes with the header, but the file has {} \
                 (truncated, or not the width it claims)",
                if masked { " with a loss mask" } else { "" },
                expected.map_or_else(|| "too many".to_string(), |e| e.to_string()),
                bytes.len()
            )));
        }
        if n_tokens == 0 {
            return Err(DataError::Empty { source_name: name.to_string() });
        }
        let n_tokens = n_tokens as usize;
        let mask_at = masked.then_some(HEADER_BYTES + n_tokens * width.bytes());
        Ok(Layout { tokens_at: HEADER_BYTES, width, n_tokens, mask_at })
    }
}

/// One checked source of tokens.
struct Shard {
    /// The file's path, or the name given to in-memory tokens; used in messages.
    name: String,
    bytes: Bytes,
    layout: Layout,
}

impl Shard {
    fn len(&self) -> usize {
        self.layout.n_tokens
    }

    /// Token `i` widened to `u32`.
    #[inline]
    fn token(&self, i: usize) -> u32 {
        let at = self.layout.tokens_at + i * self.layout.width.bytes();
        match self.layout.width {
            TokenWidth::U16 => u32::from(u16::from_le_bytes([self.bytes[at], self.bytes[at + 1]])),
            TokenWidth::U32 => u32::from_le_bytes(self.bytes[at..at + 4].try_into().expect("4 bytes")),
        }
    }

    /// Whether token `i` is a loss token (always, without a mask).
    #[inline]
    fn counts(&self, i: usize) -> bool {
        self.layout.mask_at.is_none_or(|at| self.bytes[at + i] != 0)
    }

    /// Token `i` as a target: the id, or [`IGNORE_TARGET`] where the mask is 0.
    #[inline]
    fn target(&self, i: usize) -> u32 {
        if self.counts(i) {
            self.token(i)
        } else {
            IGNORE_TARGET
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
        // SAFETY: the map is read-only; as with every memory map, the file must not be
        // truncated by another process while training reads it.
        let map = unsafe { Mmap::map(&file) }.map_err(io_error)?;
        let layout = Layout::parse(&name, &map)?;
        let shard = Shard { name, bytes: Bytes::Mapped(map), layout };
        shard.check(vocab_size)?;
        Ok(shard)
    }

    /// In-memory tokens (and optionally a loss mask), held in the layout
    /// [`write_tokens`] would write them in.
    fn from_tokens(name: &str, tokens: &[u32], mask: Option<&[u8]>, vocab_size: usize) -> Result<Shard, DataError> {
        if tokens.is_empty() {
            return Err(DataError::Empty { source_name: name.to_string() });
        }
        let bytes = shard_bytes(name, tokens, TokenWidth::for_vocab(vocab_size), mask)?;
        let layout = Layout::parse(name, &bytes)?;
        let shard = Shard { name: name.to_string(), bytes: Bytes::Owned(bytes), layout };
        shard.check(vocab_size)?;
        Ok(shard)
    }

    /// Errors on the first token id `≥ vocab_size`, then on the first mask byte that is
    /// not 0 or 1.
    fn check(&self, vocab_size: usize) -> Result<(), DataError> {
        const SCAN_CHUNK: usize = 1 << 20;
        let n = self.len();
        let first_bad = |bad: &(dyn Fn(usize) -> bool + Sync)| {
            (0..n.div_ceil(SCAN_CHUNK))
                .into_par_iter()
                .find_map_first(|chunk| (chunk * SCAN_CHUNK..((chunk + 1) * SCAN_CHUNK).min(n)).find(|&i| bad(i)))
        };
        if let Some(offset) = first_bad(&|i| self.token(i) as usize >= vocab_size) {
            return Err(DataError::TokenOutOfRange {
                source_name: self.name.clone(),
                offset: offset as u64,
                byte: (self.layout.tokens_at + offset * self.layout.width.bytes()) as u64,
                token: self.token(offset),
                vocab: vocab_size,
            });
        }
        if let Some(at) = self.layout.mask_at {
            if let Some(offset) = first_bad(&|i| self.bytes[at + i] > 1) {
                return Err(DataError::BadMask {
                    source_name: self.name.clone(),
                    offset: offset as u64,
                    byte: (at + offset) as u64,
                    value: self.bytes[at + offset],
                });
            }
        }
        Ok(())
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
        let tokens: Vec<u32> = tokens.into_iter().map(u32::from).collect();
        Dataset::split_by_fraction(vec![Shard::from_tokens(name, &tokens, None, vocab_size)?], val_fraction, seq)
    }

    /// In-memory tokens, all of them training data.
    pub fn from_tokens(name: &str, tokens: Vec<u16>, vocab_size: usize, seq: usize) -> Result<Dataset, DataError> {
        let tokens: Vec<u32> = tokens.into_iter().map(u32::from).collect();
        Dataset::from_masked_tokens(name, &tokens, None, vocab_size, seq)
    }

    /// In-memory tokens of any width with an optional loss mask (one byte, 0 or 1, per
    /// token; see the module docs), all of them training data.
    pub fn from_masked_tokens(
        name: &str,
        tokens: &[u32],
        mask: Option<&[u8]>,
        vocab_size: usize,
        seq: usize,
    ) -> Result<Dataset, DataError> {
        let shard = Shard::from_tokens(name, tokens, mask, vocab_size)?;
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

    /// True when some shard has a loss mask (chat data): targets may be
    /// [`IGNORE_TARGET`].
    pub fn is_masked(&self) -> bool {
        self.regions.iter().any(|r| self.shards[r.shard].layout.mask_at.is_some())
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
    /// `inputs[b·seq + s] = w_b[s]`, `targets[b·seq + s] = w_b[s + 1]`, or
    /// [`IGNORE_TARGET`] where the loss mask of `w_b[s + 1]` is 0.
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
                target_row[s] = shard.target(start + s + 1);
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

/// Targets of `targets` the loss counts (those not [`IGNORE_TARGET`]).
pub fn loss_tokens(targets: &[u32]) -> usize {
    targets.iter().filter(|&&t| t != IGNORE_TARGET).count()
}

/// Writes `tokens` as a llama2.c shard file (little-endian u16, no header).
pub fn write_shard(path: &Path, tokens: &[u16]) -> Result<(), DataError> {
    let tokens: Vec<u32> = tokens.iter().map(|&t| u32::from(t)).collect();
    write_tokens(path, &tokens, TokenWidth::U16, None)
}

/// Writes a shard file: llama2.c's headerless u16 layout for u16 tokens without a mask,
/// else the headed layout (see the module docs). Atomically: a temporary file in the
/// same folder, synced, then renamed over `path`.
pub fn write_tokens(path: &Path, tokens: &[u32], width: TokenWidth, mask: Option<&[u8]>) -> Result<(), DataError> {
    let bytes = shard_bytes(&path.display().to_string(), tokens, width, mask)?;
    let io_error = |source| DataError::Io { path: path.to_path_buf(), source };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let write = || -> io::Result<()> {
        let mut file = File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_error(e)
    })
}

/// The bytes of a shard file holding `tokens` (and `mask`), as [`write_tokens`] writes.
fn shard_bytes(name: &str, tokens: &[u32], width: TokenWidth, mask: Option<&[u8]>) -> Result<Vec<u8>, DataError> {
    if let Some(mask) = mask {
        if mask.len() != tokens.len() {
            return Err(DataError::MaskLength { source_name: name.into(), tokens: tokens.len(), mask: mask.len() });
        }
        if let Some(offset) = mask.iter().position(|&m| m > 1) {
            let value = mask[offset];
            return Err(DataError::BadMask { source_name: name.into(), offset: offset as u64, byte: 0, value });
        }
    }
    if let Some(offset) = tokens.iter().position(|&t| t as usize >= width.max_vocab()) {
        return Err(DataError::TooWide { source_name: name.into(), offset, token: tokens[offset], width });
    }
    let headed = width != TokenWidth::U16 || mask.is_some();
    let mut bytes = Vec::with_capacity(
        if headed { HEADER_BYTES } else { 0 } + tokens.len() * (width.bytes() + usize::from(mask.is_some())),
    );
    if headed {
        bytes.extend_from_slice(SHARD_MAGIC);
        bytes.extend_from_slice(&SHARD_VERSION.to_le_bytes());
        bytes.extend_from_slice(&(width.bytes() as u32).to_le_bytes());
        bytes.extend_from_slice(&(if mask.is_some() { FLAG_MASK } else { 0 }).to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    }
    for &token in tokens {
        match width {
            TokenWidth::U16 => bytes.extend_from_slice(&(token as u16).to_le_bytes()),
            TokenWidth::U32 => bytes.extend_from_slice(&token.to_le_bytes()),
        }
    }
    if let Some(mask) = mask {
        bytes.extend_from_slice(mask);
    }
    Ok(bytes)
}
