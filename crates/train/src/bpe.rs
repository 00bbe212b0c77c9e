//! Training a byte-pair-encoding vocabulary for llama2.c's tokenizer, and pretokenizing
//! text into a data shard with it.
//!
//! The vocabulary has SentencePiece's shape, as llama2.c exports it to `tokenizer.bin`:
//!
//! | ids | pieces | score |
//! |---|---|---|
//! | 0, 1, 2 | `<unk>`, `"\n<s>\n"`, `"\n</s>\n"` (llama2.c's spelling of BOS and EOS) | 0 |
//! | 3 ..= 258 | byte pieces `<0x00>` ..= `<0xFF>`, so every UTF-8 string is encodable | 0 |
//! | then | every character of the training text (most frequent first) | 0 |
//! | then | merged pieces, in the order they were learned | −1, −2, … |
//!
//! llama2.c's encoder looks each code point up as a piece (falling back to byte pieces),
//! then repeatedly merges the adjacent pair whose concatenation is the highest-scoring
//! piece. With score = −(merge rank), that replays the merges in the order training
//! learned them. Characters must be pieces of their own for the encoder's first step, as
//! in SentencePiece.
//!
//! Training follows SentencePiece's conventions: text gets a leading space (llama2.c's
//! encoder adds the same "dummy prefix"), and is first split into chunks — a run of
//! letters, of digits, of other symbols, or of whitespace, where a single space joins the
//! run after it — so pieces may start with a space but never contain one elsewhere
//! (`" upon"`, `"ed"`, `"."` but not `"a day"`). Ties between equally frequent pairs are
//! broken by piece id, so training is deterministic.
//!
//! ```
//! let texts = vec!["the cat sat on the mat".to_string(); 10];
//! let (pieces, scores) = train::bpe::train_bpe(&texts, 300).unwrap();
//! assert!(pieces.len() < 300); // this text runs out of pairs once every word is a piece
//! assert_eq!(pieces[3 + 0x41], "<0x41>");
//! assert!(pieces.contains(&" the".to_string()));
//! let tokenizer = llama::Tokenizer::new(pieces, scores).unwrap();
//! assert_eq!(tokenizer.encode("the mat", false, false).len(), 2); // " the", " mat"
//! ```

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::Path;

use rayon::prelude::*;

use crate::data::{self, DataError};

/// Vocabulary size of the built-in tokenizer: small enough that a tiny model's
/// embedding and classifier stay cheap, large enough to halve the tokens per byte.
pub const DEFAULT_VOCAB_SIZE: usize = 512;

/// The pieces every vocabulary starts with (llama2.c's export of SentencePiece's).
pub const SPECIAL_PIECES: [&str; 3] = ["<unk>", "\n<s>\n", "\n</s>\n"];

/// Ids before the first character piece: the specials and the 256 byte pieces.
pub const FIRST_CHAR_ID: usize = SPECIAL_PIECES.len() + 256;

/// What can go wrong training a vocabulary or pretokenizing with it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BpeError {
    #[error("vocabulary size {vocab_size} is too small: the special and byte pieces alone take {FIRST_CHAR_ID}, plus at least the space")]
    VocabTooSmall { vocab_size: usize },
    #[error("no text to train on (all {n_texts} texts are empty)")]
    NoText { n_texts: usize },
    #[error("a vocabulary of {vocab_size} pieces does not fit the u16 token ids of a data shard (at most 65536)")]
    VocabTooLargeForShard { vocab_size: usize },
    #[error(transparent)]
    Tokenizer(#[from] llama::Error),
    #[error(transparent)]
    Data(#[from] DataError),
}

// ---------------------------------------------------------------------------------------
// Chunking
// ---------------------------------------------------------------------------------------

/// The class of a character for chunking; a chunk never mixes classes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Letters, and the apostrophe so that `"'s"` can become a piece.
    Letter,
    Digit,
    Space,
    Other,
}

fn class(c: char) -> Class {
    if c.is_alphabetic() || c == '\'' {
        Class::Letter
    } else if c.is_numeric() {
        Class::Digit
    } else if c.is_whitespace() {
        Class::Space
    } else {
        Class::Other
    }
}

/// Splits text into chunks: runs of one class, a single space joining the run after it.
fn chunks(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        let mut chars = rest.char_indices().peekable();
        let (_, first) = chars.next()?;
        let mut run_class = class(first);
        if first == ' ' {
            // A space followed by a non-space starts that run ("  x" is " ", " x").
            if let Some(&(_, next)) = chars.peek() {
                if class(next) != Class::Space {
                    run_class = class(next);
                    chars.next();
                }
            }
        }
        let mut end = rest.len();
        while let Some(&(i, c)) = chars.peek() {
            let joins_next_run = c == ' ' && run_class == Class::Space && {
                let after = rest[i + 1..].chars().next();
                after.is_some_and(|a| class(a) != Class::Space)
            };
            if class(c) != run_class || joins_next_run {
                end = i;
                break;
            }
            chars.next();
        }
        let (chunk, tail) = rest.split_at(end);
        rest = tail;
        Some(chunk)
    })
}

// ---------------------------------------------------------------------------------------
// Training
// ---------------------------------------------------------------------------------------

/// A symbol that never pairs: a character left out of the vocabulary (the encoder gives
/// it byte pieces, which no merge involves).
const BARRIER: u32 = u32::MAX;

/// Learns a vocabulary of (at most) `vocab_size` pieces from `texts`, returned as
/// `(pieces, scores)` in the layout of the module docs. The result has exactly
/// `vocab_size` pieces unless the text runs out of pairs to merge first.
///
/// When the text has more distinct characters than fit, the rarest are left to byte
/// fallback.
pub fn train_bpe(texts: &[String], vocab_size: usize) -> Result<(Vec<String>, Vec<f32>), BpeError> {
    if vocab_size <= FIRST_CHAR_ID {
        return Err(BpeError::VocabTooSmall { vocab_size });
    }
    let chunk_counts = count_chunks(texts);
    if chunk_counts.is_empty() {
        return Err(BpeError::NoText { n_texts: texts.len() });
    }

    let mut vocab = Vocab::base();
    // The alphabet: most frequent characters first, as many as fit.
    let mut char_counts: HashMap<char, u64> = HashMap::new();
    for (chunk, &count) in &chunk_counts {
        for c in chunk.chars() {
            *char_counts.entry(c).or_default() += count;
        }
    }
    let mut alphabet: Vec<(char, u64)> = char_counts.into_iter().collect();
    alphabet.sort_by_key(|&(c, count)| (Reverse(count), c));
    alphabet.truncate(vocab_size - FIRST_CHAR_ID);
    for &(c, _) in &alphabet {
        vocab.add(c.to_string());
    }
    let n_base = vocab.pieces.len();

    // Words: each distinct chunk as a sequence of piece ids, with its count.
    let mut distinct: Vec<(&str, u64)> = chunk_counts.iter().map(|(chunk, &count)| (chunk.as_str(), count)).collect();
    distinct.sort_unstable();
    let mut words: Vec<Word> = distinct
        .iter()
        .map(|&(chunk, count)| Word {
            symbols: chunk.chars().map(|c| vocab.id(&c.to_string()).unwrap_or(BARRIER)).collect(),
            count: count as i64,
        })
        .collect();

    let mut merger = Merger::new(&words);
    let mut merges_done = 0u32;
    while vocab.pieces.len() < vocab_size {
        let Some((left, right)) = merger.pop_best() else { break };
        let merged = format!("{}{}", vocab.pieces[left as usize], vocab.pieces[right as usize]);
        // Another pair may already have produced the same string: reuse its id.
        let id = match vocab.id(&merged) {
            Some(id) => id,
            None => vocab.add(merged),
        };
        merger.apply(&mut words, (left, right), id, merges_done);
        merges_done += 1;
    }

    let scores =
        (0..vocab.pieces.len()).map(|id| if id < n_base { 0.0 } else { -((id - n_base + 1) as f32) }).collect();
    Ok((vocab.pieces, scores))
}

/// Chunk → occurrences over all texts, each text with its dummy-prefix space.
fn count_chunks(texts: &[String]) -> HashMap<String, u64> {
    let mut counts: HashMap<String, u64> = HashMap::new();
    let mut prefixed = String::new();
    for text in texts {
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        prefixed.clear();
        prefixed.push(' ');
        prefixed.push_str(text);
        for chunk in chunks(&prefixed) {
            match counts.get_mut(chunk) {
                Some(count) => *count += 1,
                None => {
                    counts.insert(chunk.to_string(), 1);
                }
            }
        }
    }
    counts
}

/// The pieces so far and a lookup from piece to id.
struct Vocab {
    pieces: Vec<String>,
    ids: HashMap<String, u32>,
}

impl Vocab {
    /// The specials and the byte pieces.
    fn base() -> Vocab {
        let mut vocab = Vocab { pieces: Vec::new(), ids: HashMap::new() };
        for piece in SPECIAL_PIECES {
            vocab.add(piece.to_string());
        }
        for byte in 0..=255u8 {
            vocab.add(format!("<0x{byte:02X}>"));
        }
        vocab
    }

    fn add(&mut self, piece: String) -> u32 {
        let id = self.pieces.len() as u32;
        self.ids.insert(piece.clone(), id);
        self.pieces.push(piece);
        id
    }

    fn id(&self, piece: &str) -> Option<u32> {
        self.ids.get(piece).copied()
    }
}

/// A distinct chunk of the training text.
struct Word {
    symbols: Vec<u32>,
    count: i64,
}

type Pair = (u32, u32);

/// Pair statistics kept up to date across merges, so each merge touches only the words
/// that contain its pair.
struct Merger {
    /// Occurrences of each adjacent pair, weighted by word counts.
    counts: HashMap<Pair, i64>,
    /// Words that contained the pair when it was recorded (may be stale; checked on use).
    words_with: HashMap<Pair, Vec<u32>>,
    /// Max-heap of (count, smaller pair first); entries whose count is stale are skipped.
    heap: BinaryHeap<(i64, Reverse<Pair>)>,
    /// The merge that last visited each word, to visit a word once per merge.
    visited: Vec<u32>,
}

impl Merger {
    fn new(words: &[Word]) -> Merger {
        let mut merger = Merger {
            counts: HashMap::new(),
            words_with: HashMap::new(),
            heap: BinaryHeap::new(),
            visited: vec![u32::MAX; words.len()],
        };
        for (w, word) in words.iter().enumerate() {
            for pair in pairs(&word.symbols) {
                *merger.counts.entry(pair).or_default() += word.count;
                merger.words_with.entry(pair).or_default().push(w as u32);
            }
        }
        for (&pair, &count) in &merger.counts {
            merger.heap.push((count, Reverse(pair)));
        }
        merger
    }

    /// The most frequent pair (ties: the smallest ids), if any pair is left.
    fn pop_best(&mut self) -> Option<Pair> {
        while let Some((count, Reverse(pair))) = self.heap.pop() {
            if count > 0 && self.counts.get(&pair) == Some(&count) {
                return Some(pair);
            }
        }
        None
    }

    /// Replaces every occurrence of `pair` by `id` and updates the statistics.
    fn apply(&mut self, words: &mut [Word], pair: Pair, id: u32, merge_index: u32) {
        let mut touched: Vec<Pair> = Vec::new();
        for w in self.words_with.remove(&pair).unwrap_or_default() {
            if std::mem::replace(&mut self.visited[w as usize], merge_index) == merge_index {
                continue;
            }
            let word = &mut words[w as usize];
            let merged = merge_symbols(&word.symbols, pair, id);
            if merged.len() == word.symbols.len() {
                continue; // stale entry: the pair is no longer in this word
            }
            for old in pairs(&word.symbols) {
                *self.counts.get_mut(&old).expect("counted") -= word.count;
                touched.push(old);
            }
            for new in pairs(&merged) {
                *self.counts.entry(new).or_default() += word.count;
                touched.push(new);
                if new.0 == id || new.1 == id {
                    self.words_with.entry(new).or_default().push(w);
                }
            }
            word.symbols = merged;
        }
        touched.sort_unstable();
        touched.dedup();
        for pair in touched {
            match self.counts.get(&pair) {
                Some(&count) if count > 0 => self.heap.push((count, Reverse(pair))),
                _ => {
                    self.counts.remove(&pair);
                }
            }
        }
    }
}

/// Adjacent symbol pairs, skipping any that involve a barrier.
fn pairs(symbols: &[u32]) -> impl Iterator<Item = Pair> + '_ {
    symbols.windows(2).map(|w| (w[0], w[1])).filter(|&(a, b)| a != BARRIER && b != BARRIER)
}

/// `symbols` with each occurrence of `pair`, left to right, replaced by `id`.
fn merge_symbols(symbols: &[u32], pair: Pair, id: u32) -> Vec<u32> {
    let mut out = Vec::with_capacity(symbols.len());
    let mut i = 0;
    while i < symbols.len() {
        if i + 1 < symbols.len() && (symbols[i], symbols[i + 1]) == pair {
            out.push(id);
            i += 2;
        } else {
            out.push(symbols[i]);
            i += 1;
        }
    }
    out
}

/// Trains a vocabulary and wraps it in a [`llama::Tokenizer`].
pub fn train_tokenizer(texts: &[String], vocab_size: usize) -> Result<llama::Tokenizer, BpeError> {
    let (pieces, scores) = train_bpe(texts, vocab_size)?;
    Ok(llama::Tokenizer::new(pieces, scores)?)
}

// ---------------------------------------------------------------------------------------
// Pretokenizing
// ---------------------------------------------------------------------------------------

/// Encodes texts into one token stream as llama2.c's pretokenizer does: each text
/// trimmed, preceded by BOS, no EOS.
pub fn encode_texts(tokenizer: &llama::Tokenizer, texts: &[String]) -> Result<Vec<u16>, BpeError> {
    let vocab_size = tokenizer.vocab_size();
    if vocab_size > usize::from(u16::MAX) + 1 {
        return Err(BpeError::VocabTooLargeForShard { vocab_size });
    }
    let encoded: Vec<Vec<u32>> = texts.par_iter().map(|text| tokenizer.encode(text.trim(), true, false)).collect();
    // Every id is below vocab_size ≤ 65536, so the narrowing is exact.
    Ok(encoded.into_iter().flatten().map(|id| id as u16).collect())
}

/// Encodes texts (see [`encode_texts`]) into a shard file at `path`; returns the number
/// of tokens written.
pub fn pretokenize(tokenizer: &llama::Tokenizer, texts: &[String], path: &Path) -> Result<usize, BpeError> {
    let tokens = encode_texts(tokenizer, texts)?;
    data::write_shard(path, &tokens)?;
    Ok(tokens.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_keep_a_leading_space_and_split_classes() {
        let got: Vec<&str> = chunks(" Once upon a time, Lily's cat said \"hi!\"\n\nThe  end 42.").collect();
        let want = [
            " Once", " upon", " a", " time", ",", " Lily's", " cat", " said", " \"", "hi", "!\"", "\n\n", "The", " ",
            " end", " 42", ".",
        ];
        assert_eq!(got, want);
        assert_eq!(chunks("").count(), 0);
        assert_eq!(chunks(" ").collect::<Vec<_>>(), [" "]);
    }

    #[test]
    fn merge_symbols_replaces_left_to_right_without_overlap() {
        assert_eq!(merge_symbols(&[1, 1, 1, 2, 1, 1], (1, 1), 9), [9, 1, 2, 9]);
        assert_eq!(merge_symbols(&[1, 2, 3], (2, 1), 9), [1, 2, 3]);
    }
}
