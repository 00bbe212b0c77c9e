//! The BPE trainer: vocabulary layout, determinism, and — with a llama2.c-style greedy
//! encoder written here from run.c — exact round trips and real compression on stories
//! it was not trained on.

use std::collections::{HashMap, HashSet};

use train::bpe::*;
use train::corpus;
use train::data::{Dataset, BOS};

/// llama2.c run.c `encode()` (no BOS/EOS), written plainly: dummy prefix, code points or
/// byte fallback, then merge the best-scoring adjacent pair until none merges.
fn encode_like_run_c(pieces: &[String], scores: &[f32], text: &str) -> Vec<usize> {
    let lookup: HashMap<&str, usize> = pieces.iter().enumerate().map(|(i, p)| (p.as_str(), i)).collect();
    let mut tokens = Vec::new();
    let mut push = |s: &str| match lookup.get(s) {
        Some(&id) => tokens.push(id),
        None => tokens.extend(s.bytes().map(|b| b as usize + 3)),
    };
    if !text.is_empty() {
        push(" ");
    }
    for c in text.chars() {
        push(c.encode_utf8(&mut [0; 4]));
    }
    loop {
        let mut best: Option<(f32, usize, usize)> = None;
        for i in 0..tokens.len().saturating_sub(1) {
            let joined = format!("{}{}", pieces[tokens[i]], pieces[tokens[i + 1]]);
            if let Some(&id) = lookup.get(joined.as_str()) {
                if best.is_none_or(|(score, _, _)| scores[id] > score) {
                    best = Some((scores[id], i, id));
                }
            }
        }
        let Some((_, i, id)) = best else { break };
        tokens[i] = id;
        tokens.remove(i + 1);
    }
    tokens
}

/// Inverse of the encoder: byte pieces to bytes, the dummy-prefix space dropped.
fn decode(pieces: &[String], tokens: &[usize]) -> String {
    let mut bytes = Vec::new();
    for &t in tokens {
        let piece = &pieces[t];
        if (3..259).contains(&t) {
            bytes.push((t - 3) as u8);
        } else {
            bytes.extend_from_slice(piece.as_bytes());
        }
    }
    assert_eq!(bytes.first(), Some(&b' '), "the dummy prefix comes first");
    String::from_utf8(bytes[1..].to_vec()).expect("valid UTF-8")
}

#[test]
fn vocabulary_layout_is_llama2c_sentencepiece_style() {
    let texts = corpus::generate(200, 5);
    let (pieces, scores) = train_bpe(&texts, DEFAULT_VOCAB_SIZE).unwrap();
    assert_eq!(pieces.len(), DEFAULT_VOCAB_SIZE);
    assert_eq!(scores.len(), DEFAULT_VOCAB_SIZE);
    assert_eq!(pieces[..3], ["<unk>", "\n<s>\n", "\n</s>\n"]);
    for b in 0..256 {
        assert_eq!(pieces[3 + b], format!("<0x{b:02X}>"));
    }
    let distinct: HashSet<&String> = pieces.iter().collect();
    assert_eq!(distinct.len(), pieces.len(), "no piece twice");
    // Every character of the text is a piece of its own (llama2.c's first encode step).
    for c in texts.iter().flat_map(|t| t.chars()).collect::<HashSet<char>>() {
        assert!(distinct.contains(&c.to_string()), "{c:?} is not a piece");
    }
    assert!(distinct.contains(&" ".to_string()), "the dummy-prefix space is a piece");
    // Merged pieces: scores strictly decreasing; a space only at the start.
    let first_merge = FIRST_CHAR_ID + pieces[FIRST_CHAR_ID..].iter().position(|p| p.chars().count() > 1).unwrap();
    assert!(scores[..first_merge].iter().all(|&s| s == 0.0), "specials, bytes and characters score 0");
    for w in scores[first_merge..].windows(2) {
        assert!(w[1] < w[0], "merge scores decrease: {w:?}");
    }
    for piece in &pieces[first_merge..] {
        assert!(!piece[1..].contains(' '), "{piece:?} has an inner space");
    }
    assert!(pieces.contains(&" the".to_string()) && pieces.contains(&" was".to_string()), "common words are pieces");
}

#[test]
fn training_is_deterministic() {
    let texts = corpus::generate(100, 8);
    assert_eq!(train_bpe(&texts, 400).unwrap(), train_bpe(&texts, 400).unwrap());
}

#[test]
fn held_out_stories_round_trip_and_compress() {
    let train_texts = corpus::generate(corpus::DEFAULT_STORIES, 1);
    let (pieces, scores) = train_bpe(&train_texts, DEFAULT_VOCAB_SIZE).unwrap();
    let tokenizer = llama::Tokenizer::new(pieces.clone(), scores.clone()).unwrap();
    let held_out = corpus::generate(20, 999);
    let (mut n_tokens, mut n_bytes) = (0, 0);
    for story in &held_out {
        let tokens = encode_like_run_c(&pieces, &scores, story);
        assert_eq!(decode(&pieces, &tokens), *story);
        // The llama crate's encoder (the one training uses) agrees token for token.
        let ids: Vec<usize> = tokenizer.encode(story, false, false).into_iter().map(|t| t as usize).collect();
        assert_eq!(ids, tokens);
        n_tokens += tokens.len();
        n_bytes += story.len();
    }
    assert!(n_tokens * 2 < n_bytes, "{n_tokens} tokens for {n_bytes} bytes");
}

#[test]
fn text_outside_the_training_alphabet_falls_back_to_bytes() {
    let (pieces, scores) = train_bpe(&corpus::generate(50, 2), 350).unwrap();
    for text in ["café Ünïcödé 日本語 🙂", "Tab\tand ~weird~ {chars}", "x"] {
        let tokens = encode_like_run_c(&pieces, &scores, text);
        assert_eq!(decode(&pieces, &tokens), text);
    }
}

#[test]
fn rare_characters_are_left_to_byte_fallback_when_the_alphabet_does_not_fit() {
    // 26 letters + space, but room for only 10 characters and no merges.
    let texts = vec!["abcdefghijklmnopqrstuvwxyz aaaa bbbb cccc dddd eeee ffff gggg hhhh iiii".to_string()];
    let (pieces, scores) = train_bpe(&texts, FIRST_CHAR_ID + 10).unwrap();
    assert_eq!(pieces.len(), FIRST_CHAR_ID + 10);
    assert!(pieces.contains(&" ".to_string()) && pieces.contains(&"a".to_string()));
    assert!(!pieces.contains(&"z".to_string()), "the rarest letters are not pieces");
    let tokens = encode_like_run_c(&pieces, &scores, &texts[0]);
    assert_eq!(decode(&pieces, &tokens), texts[0]);
}

#[test]
fn bad_requests_are_errors() {
    let texts = corpus::generate(3, 1);
    assert!(matches!(train_bpe(&texts, 259), Err(BpeError::VocabTooSmall { vocab_size: 259 })));
    assert!(matches!(train_bpe(&[String::new(), "  ".into()], 300), Err(BpeError::NoText { n_texts: 2 })));
    assert!(train_bpe(&texts, 259).unwrap_err().to_string().contains("259"));
}

#[test]
fn pretokenized_shard_has_bos_before_each_story_and_loads() {
    let stories = corpus::generate(40, 3);
    let tokenizer = train_tokenizer(&stories, 400).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stories.bin");
    let n = pretokenize(&tokenizer, &stories, &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len(), 2 * n);
    let tokens: Vec<u16> = bytes.chunks(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
    assert_eq!(tokens[0], BOS);
    assert_eq!(tokens.iter().filter(|&&t| t == BOS).count(), stories.len());
    // Each BOS-delimited stretch decodes to its story.
    let mut starts: Vec<usize> = tokens.iter().enumerate().filter(|(_, &t)| t == BOS).map(|(i, _)| i).collect();
    starts.push(tokens.len());
    for (story, range) in stories.iter().zip(starts.windows(2)) {
        let ids: Vec<u32> = tokens[range[0]..range[1]].iter().map(|&t| u32::from(t)).collect();
        assert_eq!(tokenizer.decode_all(&ids).unwrap(), story.as_bytes());
    }
    let splits = Dataset::open(&[path], &train::data::HoldOut::Fraction(0.1), tokenizer.vocab_size(), 32).unwrap();
    assert_eq!(splits.train.n_tokens() + splits.val.unwrap().n_tokens(), n);
}
