//! Pretokenizing a text corpus into token shards ([`crate::data`]), in parallel.
//!
//! Inputs are either
//! - **JSON** (`*.json`): an array of objects with a `"story"` string, as in TinyStories'
//!   `data00.json` … `data49.json` (other fields are ignored), or
//! - **text** (anything else): one story per block, blocks separated by one or more blank
//!   lines (lines of only whitespace).
//!
//! Each input becomes one shard `OUT/<stem>.bin`, as llama2.c's `tinystories.py
//! pretokenize` writes `data00.bin` for `data00.json`: every story trimmed, encoded with
//! BOS in front and no EOS, the stories in input order. Stories are encoded in parallel
//! with rayon, and collected in input order, so the bytes written do not depend on the
//! number of threads.
//!
//! Any tokenizer [`AnyTokenizer`] opens works, provided it has a beginning-of-text token.
//! The shards are llama2.c's headerless u16 files when the vocabulary fits a u16
//! (≤ 65 536 ids), else headed u32 shards (Qwen's 151 936 ids); [`shard_width`] chooses,
//! and a caller may ask for u32 with a smaller vocabulary.

use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use llama::tokenizers::AnyTokenizer;
use rayon::prelude::*;
use serde::Deserialize;

use crate::data::{self, DataError, TokenWidth};

/// What can go wrong pretokenizing, naming the file at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PretokenizeError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: not a JSON array of objects with a \"story\" string: {message}", path.display())]
    Json { path: PathBuf, message: String },
    #[error(
        "the {kind} has {vocab_size} token ids, more than the {} a u16 shard can hold; \
         write u32 shards (leave out the u16 choice)",
        TokenWidth::U16.max_vocab()
    )]
    VocabTooLarge { kind: &'static str, vocab_size: usize },
    #[error("the {kind} has no beginning-of-text token to put before each story")]
    NoBos { kind: &'static str },
    #[error("two inputs would both write {}: give inputs distinct file names", path.display())]
    SameOutput { path: PathBuf },
    #[error("no input files were given")]
    NoInputs,
    #[error("{}: {source}", path.display())]
    Tokenizer { path: PathBuf, source: llama::Error },
    #[error(transparent)]
    Data(#[from] DataError),
}

/// What one input produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardSummary {
    pub input: PathBuf,
    pub output: PathBuf,
    pub stories: usize,
    pub tokens: usize,
}

#[derive(Deserialize)]
struct Story {
    story: String,
}

/// The stories of one input file (see the module docs for the two formats).
pub fn read_stories(path: &Path) -> Result<Vec<String>, PretokenizeError> {
    let io_error = |source| PretokenizeError::Io { path: path.to_path_buf(), source };
    let is_json = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
    if is_json {
        let file = std::fs::File::open(path).map_err(io_error)?;
        let stories: Vec<Story> = serde_json::from_reader(std::io::BufReader::with_capacity(1 << 20, file))
            .map_err(|e| PretokenizeError::Json { path: path.to_path_buf(), message: e.to_string() })?;
        Ok(stories.into_iter().map(|s| s.story).collect())
    } else {
        let text = std::fs::read_to_string(path).map_err(io_error)?;
        Ok(split_blocks(&text))
    }
}

/// Blocks of text separated by blank lines, each trimmed; empty blocks are dropped.
pub fn split_blocks(text: &str) -> Vec<String> {
    let mut stories = Vec::new();
    let mut block = String::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !block.trim().is_empty() {
                stories.push(block.trim().to_string());
            }
            block.clear();
        } else {
            block.push_str(line);
            block.push('\n');
        }
    }
    if !block.trim().is_empty() {
        stories.push(block.trim().to_string());
    }
    stories
}

/// Checks that `tokenizer` can write shards (it has a BOS token) and returns its BOS id.
pub fn check_tokenizer(tokenizer: &AnyTokenizer) -> Result<u32, PretokenizeError> {
    tokenizer.bos_id().ok_or(PretokenizeError::NoBos { kind: tokenizer.kind() })
}

/// The token width of the shards for `tokenizer`: `requested`, if its ids fit, or the
/// narrowest that holds them (u16 up to 65 536 ids, else u32).
pub fn shard_width(tokenizer: &AnyTokenizer, requested: Option<TokenWidth>) -> Result<TokenWidth, PretokenizeError> {
    let vocab_size = tokenizer.vocab_size();
    match requested {
        Some(width) if vocab_size > width.max_vocab() => {
            Err(PretokenizeError::VocabTooLarge { kind: tokenizer.kind(), vocab_size })
        }
        Some(width) => Ok(width),
        None => Ok(TokenWidth::for_vocab(vocab_size)),
    }
}

/// Encodes stories into one token stream: each trimmed, BOS first, no EOS. Parallel,
/// with the result in story order whatever the number of threads. `progress` advances
/// by one per story.
pub fn encode_stories(
    tokenizer: &AnyTokenizer,
    stories: &[String],
    progress: &ProgressBar,
) -> Result<Vec<u32>, llama::Error> {
    let encoded: Vec<Vec<u32>> = stories
        .par_iter()
        .map(|story| {
            let ids = tokenizer.encode(story.trim(), true);
            progress.inc(1);
            ids
        })
        .collect::<Result<_, _>>()?;
    Ok(encoded.into_iter().flatten().collect())
}

/// Pretokenizes every input into `out_dir/<stem>.bin` (created if needed), with tokens
/// of `width` ([`shard_width`] when `None`). `progress` counts stories; its length grows
/// as each input is read.
pub fn pretokenize_files(
    tokenizer: &AnyTokenizer,
    inputs: &[PathBuf],
    out_dir: &Path,
    width: Option<TokenWidth>,
    progress: &ProgressBar,
) -> Result<Vec<ShardSummary>, PretokenizeError> {
    check_tokenizer(tokenizer)?;
    let width = shard_width(tokenizer, width)?;
    if inputs.is_empty() {
        return Err(PretokenizeError::NoInputs);
    }
    let outputs: Vec<PathBuf> = inputs
        .iter()
        .map(|input| {
            let stem = input.file_stem().map_or_else(|| "shard".into(), |s| s.to_string_lossy().into_owned());
            out_dir.join(format!("{stem}.bin"))
        })
        .collect();
    for (i, output) in outputs.iter().enumerate() {
        if outputs[..i].contains(output) {
            return Err(PretokenizeError::SameOutput { path: output.clone() });
        }
    }
    std::fs::create_dir_all(out_dir).map_err(|source| PretokenizeError::Io { path: out_dir.to_path_buf(), source })?;
    let mut summaries = Vec::with_capacity(inputs.len());
    for (input, output) in inputs.iter().zip(outputs) {
        let stories = read_stories(input)?;
        progress.inc_length(stories.len() as u64);
        let tokens = encode_stories(tokenizer, &stories, progress)
            .map_err(|source| PretokenizeError::Tokenizer { path: input.clone(), source })?;
        data::write_tokens(&output, &tokens, width, None)?;
        summaries.push(ShardSummary { input: input.clone(), output, stories: stories.len(), tokens: tokens.len() });
    }
    Ok(summaries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_separated_by_blank_lines() {
        let text = "One.\nStill one.\n\n\n  \nTwo.\r\n\r\nThree.  \n";
        assert_eq!(split_blocks(text), ["One.\nStill one.", "Two.", "Three."]);
        assert!(split_blocks("\n \n").is_empty());
    }
}
