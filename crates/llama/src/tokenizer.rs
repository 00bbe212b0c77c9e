//! llama2.c's byte-pair-encoding tokenizer and its `tokenizer.bin` file.
//!
//! A vocabulary is a list of pieces (UTF-8 strings) with scores. Ids 0, 1, 2 are
//! `<unk>`, BOS and EOS; ids 3..259 are usually the byte pieces `<0x00>`..`<0xFF>`.
//! Encoding follows llama2.c `run.c` `encode()` step for step, so token ids match what
//! llama2.c (and SentencePiece, for Llama 2's vocabulary) produce:
//!
//! 1. optional BOS;
//! 2. a dummy-prefix `" "` piece when the text is non-empty (SentencePiece's
//!    `add_dummy_prefix`);
//! 3. one piece per Unicode code point, or — when the code point is not in the
//!    vocabulary — one byte piece per UTF-8 byte ("byte fallback");
//! 4. repeatedly merge the adjacent pair whose concatenation is the highest-scoring
//!    piece (leftmost on ties, scores must exceed −1e10), until no pair merges;
//! 5. optional EOS.
//!
//! Decoding maps ids back to pieces, turns byte pieces into raw bytes, and drops the
//! leading space of the piece right after BOS (the dummy prefix).
//!
//! `tokenizer.bin`: u32 max_token_length, then per token f32 score, i32 byte length,
//! the bytes. The file does not store the vocabulary size; llama2.c takes it from the
//! model, this reader reads to the end of the file — use [`Tokenizer::check_vocab`].

use std::collections::HashMap;
use std::path::Path;

use crate::error::{err, Error, Result};

/// Beginning-of-sequence id (SentencePiece / Llama convention, llama2.c run.c).
pub const BOS: u32 = 1;
/// End-of-sequence id.
pub const EOS: u32 = 2;
/// Id of `<unk>`, used for a byte whose `<0xXX>` piece the vocabulary lacks.
pub const UNK: u32 = 0;

/// run.c's merge loop starts from `best_score = -1e10` and needs a strictly higher
/// score, so pieces scoring −1e10 or lower never come out of a merge.
const MERGE_SCORE_FLOOR: f32 = -1e10;

/// `BYTES[b..b + 1]` is the one-byte slice `[b]`, with a `'static` lifetime.
static BYTES: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = i as u8;
        i += 1;
    }
    table
};

/// A BPE vocabulary with llama2.c's encode and decode.
///
/// ```
/// use llama::Tokenizer;
///
/// let pieces = ["<unk>", "\n<s>\n", "\n</s>\n", " ", "a", "b", " a", " ab"];
/// let scores = [0.0, 0.0, 0.0, -1.0, -1.0, -1.0, -2.0, -3.0];
/// let tok = Tokenizer::new(pieces.map(String::from).to_vec(), scores.to_vec()).unwrap();
/// let ids = tok.encode("ab", true, false);
/// assert_eq!(ids, vec![1, 7]); // BOS, " ab"
/// assert_eq!(tok.decode_all(&ids).unwrap(), b"ab"); // leading space after BOS dropped
/// ```
#[derive(Clone, Debug)]
pub struct Tokenizer {
    pieces: Vec<String>,
    scores: Vec<f32>,
    /// Piece → lowest id holding it (run.c binary-searches a sorted copy; vocabularies
    /// with duplicate pieces are unusual, and then we pick the lowest id).
    lookup: HashMap<String, u32>,
    /// Id of the `<0xXX>` piece for each byte, or [`UNK`] when the vocabulary lacks it.
    byte_ids: [u32; 256],
}

impl PartialEq for Tokenizer {
    fn eq(&self, other: &Tokenizer) -> bool {
        self.pieces == other.pieces
            && self.scores.iter().map(|s| s.to_bits()).eq(other.scores.iter().map(|s| s.to_bits()))
    }
}

impl Tokenizer {
    /// A tokenizer from pieces and their scores (equal lengths, at least <unk>, <s> and </s>).
    pub fn new(pieces: Vec<String>, scores: Vec<f32>) -> Result<Tokenizer> {
        if pieces.len() != scores.len() {
            return Err(err!(Mismatch, "{} pieces but {} scores", pieces.len(), scores.len()));
        }
        // Ids 0, 1 and 2 are <unk>, BOS and EOS in every llama2.c vocabulary: `encode`
        // and the sampler use them by number.
        if pieces.len() <= EOS as usize {
            return Err(err!(
                Input,
                "a tokenizer needs at least {} pieces (<unk>, <s> and </s> first), found {}",
                EOS + 1,
                pieces.len()
            ));
        }
        if pieces.len() > i32::MAX as usize {
            return Err(err!(Input, "{} pieces is more than token ids (i32) can number", pieces.len()));
        }
        let mut lookup = HashMap::with_capacity(pieces.len());
        for (id, piece) in pieces.iter().enumerate() {
            lookup.entry(piece.clone()).or_insert(id as u32);
        }
        let byte_ids = std::array::from_fn(|b| *lookup.get(&format!("<0x{b:02X}>")).unwrap_or(&UNK));
        Ok(Tokenizer { pieces, scores, lookup, byte_ids })
    }

    /// Reads a llama2.c `tokenizer.bin`, every token up to the end of the file.
    /// A SentencePiece model given instead is named as such.
    pub fn read(path: impl AsRef<Path>) -> Result<Tokenizer> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, "cannot read", e))?;
        Tokenizer::parse(&bytes).map_err(|mut e| {
            if looks_like_sentencepiece(&bytes) {
                e = err!(
                    Format,
                    "this is a SentencePiece model (tokenizer.model), not a llama2.c tokenizer.bin: pass the \
                     tokenizer.bin that goes with the model (`anetrain import-hf` writes one from a folder's \
                     tokenizer.model)"
                );
            }
            e.in_file(path)
        })
    }

    /// Parses the bytes of a `tokenizer.bin`.
    pub fn parse(bytes: &[u8]) -> Result<Tokenizer> {
        if bytes.len() < 4 {
            return Err(err!(
                Format,
                "file is {} bytes, too short for the 4-byte max_token_length header",
                bytes.len()
            ));
        }
        // max_token_length only sizes run.c's merge buffer; it is recomputed on write,
        // but a value no token reaches or beyond the file is a corrupt header.
        let max_token_length = u32::from_le_bytes(bytes[0..4].try_into().unwrap());
        let mut at = 4;
        let mut pieces = Vec::new();
        let mut scores = Vec::new();
        while at < bytes.len() {
            let index = pieces.len();
            if bytes.len() - at < 8 {
                return Err(err!(
                    Format,
                    "truncated: token {index} at byte {at} needs an 8-byte score and length, only {} remain in the file",
                    bytes.len() - at
                ));
            }
            let score = f32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
            if !score.is_finite() {
                return Err(err!(Format, "token {index} (at byte {at}) has score {score}: scores must be finite"));
            }
            let len = i32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap());
            at += 8;
            if len < 0 {
                return Err(err!(Format, "token {index} has byte length {len}"));
            }
            let len = len as usize;
            if bytes.len() - at < len {
                return Err(err!(
                    Format,
                    "truncated: token {index} is {len} bytes long, only {} remain in the file",
                    bytes.len() - at
                ));
            }
            let piece = std::str::from_utf8(&bytes[at..at + len])
                .map_err(|e| err!(Format, "token {index} is not valid UTF-8 ({e})"))?;
            pieces.push(piece.to_string());
            scores.push(score);
            at += len;
        }
        if pieces.is_empty() {
            return Err(err!(Format, "file holds no tokens"));
        }
        let longest = pieces.iter().map(|p| p.len()).max().unwrap_or(0);
        if (max_token_length as usize) < longest || max_token_length as usize > bytes.len() {
            return Err(err!(
                Format,
                "header field max_token_length is {max_token_length}, but the longest token is {longest} bytes \
                 (it must be at least that, and at most the file's {} bytes)",
                bytes.len()
            ));
        }
        Tokenizer::new(pieces, scores)
    }

    /// Writes a llama2.c `tokenizer.bin`, atomically: to a temporary file beside it,
    /// synced, then renamed over it (a crash leaves the old file or the new one).
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let written = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, &self.to_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.map_err(|e| Error::io(path, "cannot write", e))
    }

    /// The bytes of a `tokenizer.bin`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.max_token_length() as u32).to_le_bytes());
        for (piece, score) in self.pieces.iter().zip(&self.scores) {
            out.extend_from_slice(&score.to_le_bytes());
            out.extend_from_slice(&(piece.len() as i32).to_le_bytes());
            out.extend_from_slice(piece.as_bytes());
        }
        out
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// Length in bytes of the longest piece.
    pub fn max_token_length(&self) -> usize {
        self.pieces.iter().map(String::len).max().unwrap_or(0)
    }

    pub fn pieces(&self) -> &[String] {
        &self.pieces
    }

    pub fn scores(&self) -> &[f32] {
        &self.scores
    }

    /// The id of a piece, if the vocabulary has it.
    pub fn id_of(&self, piece: &str) -> Option<u32> {
        self.lookup.get(piece).copied()
    }

    /// Errors unless the vocabulary has exactly `model_vocab` tokens.
    pub fn check_vocab(&self, model_vocab: usize) -> Result<()> {
        if self.vocab_size() != model_vocab {
            return Err(err!(
                Mismatch,
                "tokenizer has {} tokens, model has {model_vocab}: they were not made for each other",
                self.vocab_size()
            ));
        }
        Ok(())
    }

    /// Encodes `text` as llama2.c `run.c` `encode()` does (see the module docs). Unlike
    /// run.c, which stops at a NUL byte, `'\0'` is encoded like any other character.
    pub fn encode(&self, text: &str, bos: bool, eos: bool) -> Vec<u32> {
        let mut tokens = Vec::with_capacity(text.len() + 3);
        if bos {
            tokens.push(BOS);
        }
        let push_code_point = |s: &str, tokens: &mut Vec<u32>| match self.lookup.get(s) {
            Some(&id) => tokens.push(id),
            None => tokens.extend(s.bytes().map(|b| self.byte_ids[b as usize])),
        };
        if !text.is_empty() {
            push_code_point(" ", &mut tokens);
        }
        let mut utf8 = [0u8; 4];
        for c in text.chars() {
            push_code_point(c.encode_utf8(&mut utf8), &mut tokens);
        }
        self.merge(&mut tokens);
        if eos {
            tokens.push(EOS);
        }
        tokens
    }

    /// The merge loop of run.c: while some adjacent pair concatenates to a piece, merge
    /// the pair whose piece scores highest (the leftmost such pair on ties).
    ///
    /// run.c looks every pair up again after each merge; a merge only changes the pairs
    /// next to it, so we keep each pair's candidate and refresh just those two. The
    /// choice made at each step is the same.
    fn merge(&self, tokens: &mut Vec<u32>) {
        let mut buffer = String::new();
        let mut candidate = |left: u32, right: u32| -> Option<(f32, u32)> {
            buffer.clear();
            buffer.push_str(&self.pieces[left as usize]);
            buffer.push_str(&self.pieces[right as usize]);
            self.lookup.get(&buffer).map(|&id| (self.scores[id as usize], id))
        };
        // pairs[i]: (score, id) of merging tokens[i] and tokens[i + 1], if a piece.
        let mut pairs: Vec<Option<(f32, u32)>> = tokens.windows(2).map(|w| candidate(w[0], w[1])).collect();
        loop {
            let mut best: Option<(usize, f32, u32)> = None;
            let mut best_score = MERGE_SCORE_FLOOR;
            for (i, pair) in pairs.iter().enumerate() {
                if let Some((score, id)) = *pair {
                    if score > best_score {
                        best_score = score;
                        best = Some((i, score, id));
                    }
                }
            }
            let Some((i, _, id)) = best else { break };
            tokens[i] = id;
            tokens.remove(i + 1);
            pairs.remove(i);
            if i > 0 {
                pairs[i - 1] = candidate(tokens[i - 1], tokens[i]);
            }
            if i + 1 < tokens.len() {
                pairs[i] = candidate(tokens[i], tokens[i + 1]);
            }
        }
    }

    /// The bytes token `token` stands for when it follows `prev_token`, as run.c
    /// `decode()`: a byte piece `<0xXX>` is the raw byte, and right after BOS a leading
    /// space is dropped. Panics if `token` is not in the vocabulary (check the model's
    /// vocabulary with [`check_vocab`](Tokenizer::check_vocab) once).
    pub fn decode(&self, prev_token: u32, token: u32) -> &[u8] {
        let piece = self.pieces[token as usize].as_bytes();
        let piece = match piece {
            [b' ', rest @ ..] if prev_token == BOS => rest,
            _ => piece,
        };
        match parse_byte_piece(piece) {
            Some(b) => &BYTES[b as usize..b as usize + 1],
            None => piece,
        }
    }

    /// The text of a whole token sequence: each token decoded after its predecessor,
    /// BOS and EOS themselves skipped. For text with every code point in the vocabulary
    /// or every byte piece present, `decode_all(&encode(text, true, _)) == text`.
    /// Errors on an id outside the vocabulary, naming its position.
    pub fn decode_all(&self, tokens: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut prev = None;
        for (i, &token) in tokens.iter().enumerate() {
            if token as usize >= self.vocab_size() {
                return Err(err!(Input, "token {i} is id {token}, outside the {}-token vocabulary", self.vocab_size()));
            }
            if token != BOS && token != EOS {
                out.extend_from_slice(self.decode(prev.unwrap_or(u32::MAX), token));
            }
            prev = Some(token);
        }
        Ok(out)
    }
}

/// `<0xXX>` (two hex digits) → the byte.
fn parse_byte_piece(piece: &[u8]) -> Option<u8> {
    match piece {
        [b'<', b'0', b'x', hi, lo, b'>'] => Some(hex_digit(*hi)? << 4 | hex_digit(*lo)?),
        _ => None,
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// What run.c's `safe_printf` would print for a decoded piece: nothing for an empty
/// piece or a single byte that is neither printable ASCII nor whitespace (C locale
/// `isprint`/`isspace`), the piece otherwise. So a control byte, or one byte of a
/// multi-byte character produced by byte fallback, is not printed.
pub fn printable(piece: &[u8]) -> &[u8] {
    match piece {
        [] => piece,
        [b] if !(b.is_ascii_graphic() || *b == b' ' || is_c_space(*b)) => &[],
        _ => piece,
    }
}

/// C's `isspace` in the "C" locale: space, \t, \n, \v, \f, \r.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// True when `bytes` start like a SentencePiece `ModelProto`: field 1 (`pieces`,
/// length-delimited: tag 0x0A), whose first piece again starts with field 1 (its
/// `piece` string). A llama2.c tokenizer.bin starts with a small u32 instead.
fn looks_like_sentencepiece(bytes: &[u8]) -> bool {
    if bytes.first() != Some(&0x0A) {
        return false;
    }
    // Skip the varint length of the first piece.
    let mut at = 1;
    while at < bytes.len() && at < 6 && bytes[at] & 0x80 != 0 {
        at += 1;
    }
    bytes.get(at + 1) == Some(&0x0A)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary with all 256 byte pieces, like llama2.c's.
    fn with_bytes(extra: &[(&str, f32)]) -> Tokenizer {
        let mut pieces = vec!["<unk>".to_string(), "\n<s>\n".to_string(), "\n</s>\n".to_string()];
        pieces.extend((0..256).map(|b| format!("<0x{b:02X}>")));
        let mut scores = vec![0.0; pieces.len()];
        for (p, s) in extra {
            pieces.push(p.to_string());
            scores.push(*s);
        }
        Tokenizer::new(pieces, scores).unwrap()
    }

    #[test]
    fn byte_fallback_uses_byte_pieces() {
        let tok = with_bytes(&[(" ", -1.0)]);
        let ids = tok.encode("é", false, false); // é = C3 A9, not in the vocabulary
        assert_eq!(ids, vec![259, 0xC3 + 3, 0xA9 + 3]);
        assert_eq!(tok.decode_all(&ids).unwrap(), " é".as_bytes());
        assert_eq!(tok.decode(259, 0xC3 + 3), &[0xC3]);
    }

    #[test]
    fn merges_pick_the_best_score_then_the_leftmost() {
        // "aaa": pairs (a,a) at 0 and 1 have equal scores → the left one merges first.
        let tok = with_bytes(&[(" ", -9.0), ("a", -9.0), ("aa", -1.0), (" a", -5.0)]);
        let (sp, a, aa, sp_a) = (259, 260, 261, 262);
        assert_eq!(tok.encode("aaa", false, false), vec![sp, aa, a]);
        // Making " a" best changes the first merge, and "aa" then takes the remaining pair.
        let tok = with_bytes(&[(" ", -9.0), ("a", -9.0), ("aa", -1.0), (" a", 0.5)]);
        assert_eq!(tok.encode("aaa", true, true), vec![BOS, sp_a, aa, EOS]);
    }

    #[test]
    fn scores_at_or_below_the_floor_never_merge() {
        let tok = with_bytes(&[(" ", -1.0), ("a", -1.0), (" a", -1e10)]);
        assert_eq!(tok.encode("a", false, false), vec![259, 260]);
        let tok = with_bytes(&[(" ", -1.0), ("a", -1.0), (" a", -0.99e10)]);
        assert_eq!(tok.encode("a", false, false), vec![261]);
    }

    #[test]
    fn empty_text_has_no_dummy_prefix() {
        let tok = with_bytes(&[(" ", -1.0)]);
        assert_eq!(tok.encode("", true, true), vec![BOS, EOS]);
        assert!(tok.encode("", false, false).is_empty());
    }

    #[test]
    fn decode_strips_one_space_after_bos_only() {
        let tok = with_bytes(&[(" ", -1.0), ("  x", -1.0)]);
        assert_eq!(tok.decode(BOS, 260), b" x");
        assert_eq!(tok.decode(5, 260), b"  x");
        assert_eq!(tok.decode(BOS, 3 + b'A' as u32), b"A");
    }

    #[test]
    fn printable_matches_safe_printf() {
        assert_eq!(printable(b""), b"");
        assert_eq!(printable(b"\n"), b"\n");
        assert_eq!(printable(b"a"), b"a");
        assert_eq!(printable(&[0x07]), b"");
        assert_eq!(printable(&[0xC3]), b"");
        assert_eq!(printable(&[0xC3, 0xA9]), &[0xC3, 0xA9]);
        assert_eq!(printable(b"\x07x"), b"\x07x");
    }

    #[test]
    fn bad_files_name_the_token() {
        let tok = with_bytes(&[(" a", -1.0)]);
        let bytes = tok.to_bytes();
        assert_eq!(Tokenizer::parse(&bytes).unwrap(), tok);
        let e = Tokenizer::parse(&bytes[..bytes.len() - 1]).unwrap_err();
        assert!(e.message.contains("token 259") && e.message.contains("truncated"), "{e}");
        let e = Tokenizer::parse(&bytes[..bytes.len() - 4]).unwrap_err();
        assert!(e.message.contains("token 259") && e.message.contains("8-byte"), "{e}");
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] = 0xFF;
        let e = Tokenizer::parse(&bad).unwrap_err();
        assert!(e.message.contains("token 259 is not valid UTF-8"), "{e}");
        let e = Tokenizer::parse(&[7, 0]).unwrap_err();
        assert!(e.message.contains("too short"), "{e}");
        let e = Tokenizer::new(vec!["a".into()], vec![]).unwrap_err();
        assert!(e.message.contains("1 pieces but 0 scores"), "{e}");
    }

    #[test]
    fn decode_all_rejects_foreign_ids() {
        let tok = with_bytes(&[]);
        let e = tok.decode_all(&[1, 5, 9999]).unwrap_err();
        assert!(e.message.contains("token 2 is id 9999"), "{e}");
    }

    #[test]
    fn check_vocab_says_both_sizes() {
        let tok = with_bytes(&[]);
        let e = tok.check_vocab(32000).unwrap_err();
        assert!(e.message.contains("tokenizer has 259 tokens, model has 32000"), "{e}");
        tok.check_vocab(259).unwrap();
    }
}
