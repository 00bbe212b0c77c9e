//! The three tokenizer files users bring, behind one type ([`AnyTokenizer`]):
//!
//! | file | read with | encode/decode by |
//! |---|---|---|
//! | llama2.c `tokenizer.bin` | [`Tokenizer::read`] | [`Tokenizer`] (run.c's BPE) |
//! | SentencePiece `.model` | the `sentencepiece-model` crate (prost, SentencePiece's own `.proto`) | [`Tokenizer`], after the conversion llama2.c's `tokenizer.py` does |
//! | Hugging Face `tokenizer.json` | the `tokenizers` crate (no network, no C code) | the `tokenizers` crate |
//!
//! A SentencePiece BPE model with the identity normalizer and a dummy prefix (Llama 2's)
//! encodes exactly as run.c's merge loop does, so converting its pieces (`▁` → space,
//! BOS/EOS spelled `"\n<s>\n"`/`"\n</s>\n"` as llama2.c exports them) gives a
//! [`Tokenizer`] equal to llama2.c's `tokenizer.bin` of the same model. Unigram models
//! and other normalizers encode differently and are refused with a clear error.
//!
//! [`tokenizer_json`] goes the other way for export: a llama2.c vocabulary as a
//! `tokenizer.json` (BPE with byte fallback, the Llama layout transformers'
//! `LlamaTokenizerFast` writes), whose merges are every split of a piece into two pieces,
//! ranked by the merged piece's score — the order run.c's loop merges in.

use std::path::Path;

use serde_json::{json, Value};

use crate::error::{err, Error, Result};
use crate::tokenizer::{Tokenizer, BOS, EOS};

/// SentencePiece's space marker, U+2581 LOWER ONE EIGHTH BLOCK.
pub const SPACE_MARKER: char = '\u{2581}';

/// Largest vocabulary whose ids fit the u16 tokens of a data shard.
pub const MAX_SHARD_VOCAB: usize = 1 << 16;

/// A tokenizer of any supported kind.
pub enum AnyTokenizer {
    /// A llama2.c `tokenizer.bin`.
    Llama2c(Tokenizer),
    /// A SentencePiece `.model`, converted to llama2.c's representation.
    SentencePiece(Tokenizer),
    /// A Hugging Face `tokenizer.json`.
    HuggingFace(Box<HfTokenizer>),
}

/// A Hugging Face `tokenizer.json` and the special ids found in it.
pub struct HfTokenizer {
    pub inner: ::tokenizers::Tokenizer,
    /// Largest id + 1, added tokens included.
    vocab_size: usize,
    bos: Option<u32>,
    eos: Vec<u32>,
}

/// Names of beginning-of-text tokens used by common `tokenizer.json` files, in order of
/// preference: Llama 1/2, Llama 3, GPT-2 / Qwen (whose documents are separated by
/// `<|endoftext|>`).
const BOS_NAMES: [&str; 3] = ["<s>", "<|begin_of_text|>", "<|endoftext|>"];
/// End-of-text names: Llama 1/2, Llama 3 (base and instruct), GPT-2 / Qwen, Qwen chat.
const EOS_NAMES: [&str; 5] = ["</s>", "<|end_of_text|>", "<|eot_id|>", "<|endoftext|>", "<|im_end|>"];

impl HfTokenizer {
    /// Parses the bytes of a `tokenizer.json`.
    pub fn from_bytes(bytes: &[u8]) -> Result<HfTokenizer> {
        let inner = ::tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| err!(Format, "not a tokenizer.json the tokenizers library can load: {e}"))?;
        let vocab_size = inner.get_vocab(true).values().map(|&id| id as usize + 1).max().unwrap_or(0);
        if vocab_size == 0 {
            return Err(err!(Format, "tokenizer.json has an empty vocabulary"));
        }
        let bos = BOS_NAMES.iter().find_map(|name| inner.token_to_id(name));
        let eos = EOS_NAMES.iter().filter_map(|name| inner.token_to_id(name)).collect();
        Ok(HfTokenizer { inner, vocab_size, bos, eos })
    }
}

impl AnyTokenizer {
    /// Opens a tokenizer file, choosing the reader by name: `*.json` is a Hugging Face
    /// `tokenizer.json`, `*.model` a SentencePiece model, anything else a llama2.c
    /// `tokenizer.bin`. A folder means its `tokenizer.json`.
    pub fn open(path: impl AsRef<Path>) -> Result<AnyTokenizer> {
        let path = path.as_ref();
        if path.is_dir() {
            return AnyTokenizer::open(path.join("tokenizer.json"));
        }
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        match ext {
            "json" => {
                let bytes = std::fs::read(path).map_err(|e| Error::io(path, "cannot read", e))?;
                Ok(AnyTokenizer::HuggingFace(Box::new(HfTokenizer::from_bytes(&bytes).map_err(|e| e.in_file(path))?)))
            }
            "model" => Ok(AnyTokenizer::SentencePiece(read_sentencepiece(path)?)),
            _ => Ok(AnyTokenizer::Llama2c(Tokenizer::read(path)?)),
        }
    }

    /// What kind of file it came from, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            AnyTokenizer::Llama2c(_) => "llama2.c tokenizer.bin",
            AnyTokenizer::SentencePiece(_) => "SentencePiece model",
            AnyTokenizer::HuggingFace(_) => "Hugging Face tokenizer.json",
        }
    }

    /// Number of token ids (largest id + 1).
    pub fn vocab_size(&self) -> usize {
        match self {
            AnyTokenizer::Llama2c(t) | AnyTokenizer::SentencePiece(t) => t.vocab_size(),
            AnyTokenizer::HuggingFace(h) => h.vocab_size,
        }
    }

    /// The beginning-of-sequence id, if the tokenizer has one.
    pub fn bos_id(&self) -> Option<u32> {
        match self {
            AnyTokenizer::Llama2c(_) | AnyTokenizer::SentencePiece(_) => Some(BOS),
            AnyTokenizer::HuggingFace(h) => h.bos,
        }
    }

    /// Ids that end a text.
    pub fn eos_ids(&self) -> Vec<u32> {
        match self {
            AnyTokenizer::Llama2c(_) | AnyTokenizer::SentencePiece(_) => vec![EOS],
            AnyTokenizer::HuggingFace(h) => h.eos.clone(),
        }
    }

    /// The llama2.c tokenizer, for the kinds that are one.
    pub fn as_llama2c(&self) -> Option<&Tokenizer> {
        match self {
            AnyTokenizer::Llama2c(t) | AnyTokenizer::SentencePiece(t) => Some(t),
            AnyTokenizer::HuggingFace(_) => None,
        }
    }

    /// Token ids of `text`, with BOS first when `bos` (an error if the tokenizer has none).
    /// A Hugging Face tokenizer encodes without its post-processor's special tokens, so
    /// BOS is added here the same way for every kind.
    pub fn encode(&self, text: &str, bos: bool) -> Result<Vec<u32>> {
        match self {
            AnyTokenizer::Llama2c(t) | AnyTokenizer::SentencePiece(t) => Ok(t.encode(text, bos, false)),
            AnyTokenizer::HuggingFace(h) => {
                let encoding = h.inner.encode(text, false).map_err(|e| err!(Input, "cannot encode: {e}"))?;
                let mut ids = Vec::with_capacity(encoding.len() + 1);
                if bos {
                    let Some(bos) = h.bos else {
                        return Err(err!(
                            Input,
                            "this tokenizer.json has no beginning-of-text token (looked for {})",
                            BOS_NAMES.join(", ")
                        ));
                    };
                    ids.push(bos);
                }
                ids.extend_from_slice(encoding.get_ids());
                Ok(ids)
            }
        }
    }

    /// A prompt's ids as the model family expects them: llama2.c and SentencePiece with
    /// BOS; a `tokenizer.json` with whatever its post-processor adds (Llama's `<s>`,
    /// nothing for Qwen). An empty prompt is just BOS where there is one.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let ids = match self {
            AnyTokenizer::Llama2c(t) | AnyTokenizer::SentencePiece(t) => t.encode(text, true, false),
            AnyTokenizer::HuggingFace(h) => {
                h.inner.encode(text, true).map_err(|e| err!(Input, "cannot encode: {e}"))?.get_ids().to_vec()
            }
        };
        match (ids.is_empty(), self.bos_id()) {
            (false, _) => Ok(ids),
            (true, Some(bos)) => Ok(vec![bos]),
            (true, None) => Err(err!(Input, "the prompt is empty and the tokenizer has no beginning-of-text token")),
        }
    }

    /// The text of `ids`, special tokens (BOS, EOS) left out. Bytes that do not form
    /// UTF-8 (a character cut by the end of `ids`) come out as U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= self.vocab_size()) {
            return Err(err!(Input, "token {i} is id {id}, outside the {}-token vocabulary", self.vocab_size()));
        }
        match self {
            AnyTokenizer::Llama2c(t) | AnyTokenizer::SentencePiece(t) => {
                Ok(String::from_utf8_lossy(&t.decode_all(ids)?).into_owned())
            }
            AnyTokenizer::HuggingFace(h) => h.inner.decode(ids, true).map_err(|e| err!(Input, "cannot decode: {e}")),
        }
    }

    /// Checks the tokenizer against a model's vocabulary. llama2.c and SentencePiece
    /// vocabularies must match it exactly (llama2.c's convention). A Hugging Face
    /// tokenizer may be smaller than the model, whose embedding rows are often padded
    /// (Qwen2.5: 151,665 token ids, 151,936 rows), but never larger.
    pub fn check_model_vocab(&self, model_vocab: usize) -> Result<()> {
        match self {
            AnyTokenizer::Llama2c(t) | AnyTokenizer::SentencePiece(t) => t.check_vocab(model_vocab),
            AnyTokenizer::HuggingFace(h) if h.vocab_size > model_vocab => Err(err!(
                Mismatch,
                "tokenizer has {} token ids, the model only {model_vocab} embedding rows: they were not made for each other",
                h.vocab_size
            )),
            AnyTokenizer::HuggingFace(_) => Ok(()),
        }
    }
}

/// Turns generated ids into text as they arrive, holding back a piece while it ends in
/// an incomplete UTF-8 character (byte-level and byte-fallback tokens split characters).
///
/// Normally each decode of the ids so far extends the text already returned. A
/// byte-fallback decoder can rewrite its tail, though: Hugging Face's turns a whole run of
/// byte tokens into U+FFFD once the run stops being valid UTF-8, so a `%` already printed
/// becomes `�` when an invalid byte joins it. What was returned stays returned, and the
/// stream carries on after it (from the first character boundary at or past its length),
/// rather than waiting forever for a text that starts with it again.
pub struct StreamDecoder {
    ids: Vec<u32>,
    printed: usize,
}

impl StreamDecoder {
    /// A decoder whose text starts after `context` (e.g. the prompt): only what later
    /// ids add is returned.
    pub fn new(tokenizer: &AnyTokenizer, context: &[u32]) -> Result<StreamDecoder> {
        let printed = tokenizer.decode(context)?.len();
        Ok(StreamDecoder { ids: context.to_vec(), printed })
    }

    /// The new text `id` completes (often empty while a character is incomplete).
    pub fn push(&mut self, tokenizer: &AnyTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = tokenizer.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        Ok(self.take_new(&text))
    }

    /// Whatever is still held back, replacement characters included.
    pub fn finish(&mut self, tokenizer: &AnyTokenizer) -> Result<String> {
        let text = tokenizer.decode(&self.ids)?;
        Ok(self.take_new(&text))
    }

    /// `text` past what was returned already.
    fn take_new(&mut self, text: &str) -> String {
        let mut from = self.printed.min(text.len());
        while !text.is_char_boundary(from) {
            from += 1;
        }
        self.printed = self.printed.max(text.len());
        text[from..].to_string()
    }
}

// ---------------------------------------------------------------------------------------
// SentencePiece
// ---------------------------------------------------------------------------------------

/// Reads a SentencePiece `.model` as a llama2.c [`Tokenizer`] (the conversion of
/// llama2.c's `tokenizer.py`). Only BPE models whose encoding run.c's loop reproduces
/// are accepted: model type BPE, the identity normalizer, a dummy prefix, no whitespace
/// squeezing, BOS = 1 and EOS = 2.
pub fn read_sentencepiece(path: impl AsRef<Path>) -> Result<Tokenizer> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, "cannot read", e))?;
    parse_sentencepiece(&bytes).map_err(|e| e.in_file(path))
}

/// Parses the bytes of a SentencePiece `.model` (see [`read_sentencepiece`]).
pub fn parse_sentencepiece(bytes: &[u8]) -> Result<Tokenizer> {
    use sentencepiece_model::{ModelType, SentencePieceModel, Type};
    let model = SentencePieceModel::from_slice(bytes)
        .map_err(|e| err!(Format, "not a SentencePiece model (protobuf ModelProto): {e}"))?;
    if model.pieces().is_empty() {
        return Err(err!(Format, "the SentencePiece model has no pieces"));
    }
    if let Some(trainer) = model.trainer() {
        if trainer.model_type() != ModelType::Bpe {
            return Err(err!(
                Unsupported,
                "SentencePiece model type {:?} is not supported; only BPE models (Llama 2's kind) encode as llama2.c does",
                trainer.model_type()
            ));
        }
        if trainer.bos_id() != BOS as i32 || trainer.eos_id() != EOS as i32 {
            return Err(err!(
                Unsupported,
                "the model's bos_id is {} and eos_id {}; llama2.c's format needs 1 and 2",
                trainer.bos_id(),
                trainer.eos_id()
            ));
        }
    }
    if let Some(normalizer) = model.model().normalizer_spec.as_ref() {
        let name = normalizer.name();
        if !(name.is_empty() || name == "identity") {
            return Err(err!(Unsupported, "SentencePiece normalizer {name:?} is not supported; only \"identity\""));
        }
        if !normalizer.add_dummy_prefix() {
            return Err(err!(
                Unsupported,
                "add_dummy_prefix is false; llama2.c's encoder always adds the dummy prefix"
            ));
        }
        if normalizer.remove_extra_whitespaces() {
            return Err(err!(Unsupported, "remove_extra_whitespaces is true; llama2.c's encoder keeps every space"));
        }
    }
    let mut pieces = Vec::with_capacity(model.pieces().len());
    let mut scores = Vec::with_capacity(model.pieces().len());
    for (id, p) in model.pieces().iter().enumerate() {
        let piece = match (id as u32, p.r#type()) {
            (BOS, Type::Control) => "\n<s>\n".to_string(),
            (EOS, Type::Control) => "\n</s>\n".to_string(),
            _ => p.piece().replace(SPACE_MARKER, " "),
        };
        pieces.push(piece);
        scores.push(p.score());
    }
    Tokenizer::new(pieces, scores)
}

// ---------------------------------------------------------------------------------------
// tokenizer.json from a llama2.c vocabulary
// ---------------------------------------------------------------------------------------

/// llama2.c's merge floor (run.c starts from best = −1e10 and needs a higher score).
const MERGE_SCORE_FLOOR: f32 = -1e10;

/// The Hugging Face spelling of a llama2.c piece: specials as `<unk>`, `<s>`, `</s>`,
/// spaces as `▁`.
fn hf_piece(id: usize, piece: &str) -> String {
    match id as u32 {
        BOS => "<s>".into(),
        EOS => "</s>".into(),
        0 => "<unk>".into(),
        _ => piece.replace(' ', &SPACE_MARKER.to_string()),
    }
}

/// A llama2.c vocabulary as a Hugging Face `tokenizer.json` (the layout of
/// transformers' `LlamaTokenizerFast`): normalizer `▁`-prefix and space → `▁`, a BPE
/// model with byte fallback, a post-processor that adds `<s>`, and the decoder that
/// undoes it all. It encodes like [`Tokenizer::encode`] except on text that spells a
/// special token (`<s>`, `</s>`, `<unk>`), which transformers matches as that token.
///
/// Merges: every split of a piece into two pieces, ranked by the merged piece's score
/// (highest first; ties by id, then split position), so the BPE merges in run.c's order.
pub fn tokenizer_json(tokenizer: &Tokenizer) -> Result<Value> {
    let pieces = tokenizer.pieces();
    let mut vocab = serde_json::Map::new();
    for (id, piece) in pieces.iter().enumerate() {
        let name = hf_piece(id, piece);
        if let Some(other) = vocab.insert(name.clone(), json!(id)) {
            return Err(err!(
                Unsupported,
                "pieces {other} and {id} are both {name:?} in Hugging Face spelling; tokenizer.json needs distinct pieces"
            ));
        }
    }
    let is_special = |id: usize| id < 3;
    let mut merges: Vec<(f32, usize, usize, String, String)> = Vec::new();
    for (id, piece) in pieces.iter().enumerate() {
        let score = tokenizer.scores()[id];
        // run.c merges into the lowest id holding a piece; later duplicates never appear.
        if is_special(id) || score <= MERGE_SCORE_FLOOR || tokenizer.id_of(piece) != Some(id as u32) {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(split);
            let (Some(l), Some(r)) = (tokenizer.id_of(left), tokenizer.id_of(right)) else { continue };
            if is_special(l as usize) || is_special(r as usize) {
                continue;
            }
            merges.push((score, id, split, hf_piece(l as usize, left), hf_piece(r as usize, right)));
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges: Vec<Value> = merges.into_iter().map(|(_, _, _, l, r)| json!([l, r])).collect();

    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    let marker = SPACE_MARKER.to_string();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<unk>"), special(BOS, "<s>"), special(EOS, "</s>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": marker},
            {"type": "Replace", "pattern": {"String": " "}, "content": marker},
        ]},
        "pre_tokenizer": null,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS], "tokens": ["<s>"]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": marker}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": "<unk>",
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    }))
}

/// The `tokenizer_config.json` that makes transformers' `AutoTokenizer` load
/// [`tokenizer_json`]'s file as a Llama tokenizer.
pub fn tokenizer_config_json(model_max_length: usize) -> Value {
    json!({
        "tokenizer_class": "LlamaTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": true,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "legacy": true,
        "model_max_length": model_max_length,
    })
}
