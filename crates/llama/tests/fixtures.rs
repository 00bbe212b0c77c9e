//! Compatibility with files made by other programs: llama2.c's stories260K checkpoint,
//! its tokenizers, and the text llama2.c's `run` printed for it.
//!
//! The fixtures live in `../shared/fixtures/` next to the project root. When that folder
//! is missing every test here fails, saying so: a missing fixture is not a pass.

use std::path::PathBuf;

use llama::llama2c::{self, Version};
use llama::tokenizer::BOS;
use llama::{generate::generate, reference, Config, Sampler, TensorKind, Tokenizer};
use proptest::prelude::*;

fn fixture(name: &str) -> PathBuf {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures"));
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "fixture {} is missing: these tests need the shared fixtures folder ../shared/fixtures \
         beside the project root (see its README.md)",
        path.display()
    );
    path
}

fn read_fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap()
}

#[test]
fn stories260k_greedy_matches_llama2c_run_byte_for_byte() {
    let params = llama2c::read_model(fixture("stories260K.bin")).unwrap();
    let tokenizer = Tokenizer::read(fixture("tok512.bin")).unwrap();
    tokenizer.check_vocab(params.config().vocab_size).unwrap();

    // `run stories260K.bin -z tok512.bin -t 0.0 -n 256`: 256 positions, no prompt.
    let steps = 256.min(params.config().seq_len);
    let mut cache = reference::KvCache::new(params.config());
    let mut out = Vec::new();
    generate(
        &tokenizer,
        &mut Sampler::greedy(),
        "",
        steps,
        |token, pos| reference::forward(&params, &mut cache, token, pos),
        |piece| out.extend_from_slice(piece),
    )
    .unwrap();
    out.push(b'\n'); // run.c prints a newline after the loop

    let expected = read_fixture("stories260K.greedy-256.txt");
    assert!(
        out == expected,
        "greedy text differs from llama2.c's\n--- ours ---\n{}\n--- llama2.c ---\n{}",
        String::from_utf8_lossy(&out),
        String::from_utf8_lossy(&expected)
    );
}

#[test]
fn stories260k_header_is_read_as_published() {
    let (params, version) = llama2c::read_model_with_version(fixture("stories260K.bin")).unwrap();
    assert_eq!(version, Version::V0);
    assert_eq!(params.config(), &Config::preset("stories260k").unwrap());
    // RMSNorm gains of a trained model are far from 0 and from the init value 1.
    let g = params.layer(0).rms_att();
    assert!(g.iter().all(|v| v.is_finite()) && g.iter().any(|&v| (v - 1.0).abs() > 0.1));
}

#[test]
fn stories260k_rewrites_to_the_same_bytes_apart_from_freq_cis() {
    let original = read_fixture("stories260K.bin");
    let params = llama2c::read_model(fixture("stories260K.bin")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.bin");
    llama2c::write_model(&params, &path, Version::V0).unwrap();
    let rewritten = std::fs::read(&path).unwrap();
    assert_eq!(rewritten.len(), original.len());

    // freq_cis sits right after rms_final: header + 4·(everything up to rms_final).
    let c = params.config();
    let freq_start = 28 + 4 * c.n_params();
    let freq_len = 4 * c.seq_len * c.head_dim();
    assert_eq!(freq_start + freq_len, original.len(), "shared classifier: freq_cis is last");
    assert_eq!(&rewritten[..freq_start], &original[..freq_start], "tensors differ");

    // Our freq_cis tables agree with PyTorch's (made by llama2.c's export.py) to rounding.
    let floats = |b: &[u8]| b.chunks_exact(4).map(|x| f32::from_le_bytes(x.try_into().unwrap())).collect::<Vec<_>>();
    let theirs = floats(&original[freq_start..]);
    let ours = floats(&rewritten[freq_start..]);
    let worst = theirs.iter().zip(&ours).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst < 2e-4, "freq_cis differs by up to {worst}");
    // And they are really cos/sin tables: real² + imag² = 1.
    let half = theirs.len() / 2;
    for i in 0..half {
        let norm = theirs[i].powi(2) + theirs[half + i].powi(2);
        assert!((norm - 1.0).abs() < 1e-5, "entry {i}");
    }
}

#[test]
fn stories260k_round_trips_through_v1() {
    let params = llama2c::read_model(fixture("stories260K.bin")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model-v1.bin");
    llama2c::write_model(&params, &path, Version::V1).unwrap();
    let (back, version) = llama2c::read_model_with_version(&path).unwrap();
    assert_eq!(version, Version::V1);
    assert_eq!(back, params);
    // v1 starts with the norms: the first floats after the header are layer 0's rms_att.
    let bytes = std::fs::read(&path).unwrap();
    let first = f32::from_le_bytes(bytes[256..260].try_into().unwrap());
    assert_eq!(first, params.layer(0).rms_att()[0]);
    let wq = params.layout().find(TensorKind::Wq, Some(0)).unwrap();
    assert_eq!(wq.shape, vec![64, 64]);
}

#[test]
fn llama2_tokenizer_encodes_like_sentencepiece() {
    let tok = Tokenizer::read(fixture("llama2-tokenizer.bin")).unwrap();
    assert_eq!(tok.vocab_size(), 32000);
    assert_eq!(tok.encode("Once upon a time", false, false), vec![9038, 2501, 263, 931]);
    assert_eq!(tok.encode("Once upon a time", true, true), vec![BOS, 9038, 2501, 263, 931, 2]);
    assert_eq!(tok.decode_all(&[BOS, 9038, 2501, 263, 931]).unwrap(), b"Once upon a time");
    let e = tok.check_vocab(512).unwrap_err();
    assert!(e.message.contains("tokenizer has 32000 tokens, model has 512"), "{e}");
}

#[test]
fn tokenizer_files_rewrite_to_identical_bytes() {
    for name in ["tok512.bin", "llama2-tokenizer.bin"] {
        let tok = Tokenizer::read(fixture(name)).unwrap();
        assert_eq!(tok.to_bytes(), read_fixture(name), "{name}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tok.bin");
        tok.write(&path).unwrap();
        assert_eq!(Tokenizer::read(&path).unwrap(), tok);
    }
}

#[test]
fn truncated_real_tokenizer_names_the_file_and_token() {
    let bytes = read_fixture("tok512.bin");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tok512-cut.bin");
    std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
    let e = Tokenizer::read(&path).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("tok512-cut.bin") && text.contains("token 511") && text.contains("truncated"), "{text}");
    // Cut exactly between two tokens, the file is well-formed but short: check_vocab says so.
    let tok = Tokenizer::read(fixture("tok512.bin")).unwrap();
    let mut short = tok.to_bytes();
    let last = tok.pieces().last().unwrap().len() + 8;
    short.truncate(short.len() - last);
    let short = Tokenizer::parse(&short).unwrap();
    let e = short.check_vocab(512).unwrap_err();
    assert!(e.message.contains("tokenizer has 511 tokens, model has 512"), "{e}");
}

/// run.c's encode, transcribed literally: every pair looked up again after each merge.
/// The library keeps per-pair candidates instead; both must choose the same merges.
fn naive_encode(tok: &Tokenizer, text: &str, bos: bool, eos: bool) -> Vec<u32> {
    let lookup = |s: &str| tok.pieces().iter().position(|p| p == s).map(|i| i as u32);
    let mut tokens = Vec::new();
    if bos {
        tokens.push(1);
    }
    let push = |s: &str, tokens: &mut Vec<u32>| match lookup(s) {
        Some(id) => tokens.push(id),
        None => tokens.extend(s.bytes().map(|b| b as u32 + 3)),
    };
    if !text.is_empty() {
        push(" ", &mut tokens);
    }
    for c in text.chars() {
        push(c.encode_utf8(&mut [0; 4]), &mut tokens);
    }
    loop {
        let (mut best_score, mut best_id, mut best_idx) = (-1e10f32, 0, None);
        for i in 0..tokens.len().saturating_sub(1) {
            let merged = format!("{}{}", tok.pieces()[tokens[i] as usize], tok.pieces()[tokens[i + 1] as usize]);
            if let Some(id) = lookup(&merged) {
                if tok.scores()[id as usize] > best_score {
                    (best_score, best_id, best_idx) = (tok.scores()[id as usize], id, Some(i));
                }
            }
        }
        let Some(i) = best_idx else { break };
        tokens[i] = best_id;
        tokens.remove(i + 1);
    }
    if eos {
        tokens.push(2);
    }
    tokens
}

fn tok512() -> &'static Tokenizer {
    static TOK: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
    TOK.get_or_init(|| Tokenizer::read(fixture("tok512.bin")).unwrap())
}

fn llama2_tokenizer() -> &'static Tokenizer {
    static TOK: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
    TOK.get_or_init(|| Tokenizer::read(fixture("llama2-tokenizer.bin")).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn tok512_round_trips_any_utf8(text in "\\PC{0,40}|[a-z ,.'\"\n]{0,80}|.{0,20}") {
        let tok = tok512();
        let ids = tok.encode(&text, true, true);
        prop_assert_eq!(tok.decode_all(&ids).unwrap(), text.as_bytes());
        prop_assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()));
    }

    #[test]
    fn tok512_encode_matches_the_literal_algorithm(text in "[a-zA-Z .,!?'\n]{0,60}|\\PC{0,12}", bos: bool, eos: bool) {
        prop_assert_eq!(tok512().encode(&text, bos, eos), naive_encode(tok512(), &text, bos, eos));
    }
}

proptest! {
    // The naive encoder scans 32000 pieces per lookup: keep the cases few and short.
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn llama2_encode_matches_the_literal_algorithm(text in "[a-zA-Z .,'\n]{0,24}|\\PC{0,6}") {
        let tok = llama2_tokenizer();
        let ids = tok.encode(&text, true, false);
        prop_assert_eq!(&ids, &naive_encode(tok, &text, true, false));
        prop_assert_eq!(tok.decode_all(&ids).unwrap(), text.as_bytes());
    }
}
