//! llama2.c model.bin and tokenizer.bin: exact round trips, the byte layout export.py
//! writes, and clear errors for broken files. Needs no fixtures.

use std::path::{Path, PathBuf};

use llama::llama2c::{self, Version};
use llama::{Config, ErrorKind, Params, Tokenizer};

fn tiny_gqa(shared: bool) -> Config {
    Config { shared_classifier: shared, seq_len: 16, ..Config::preset("tiny").unwrap() }
}

/// Parameters whose values are all distinct and include the awkward finite ones (−0,
/// subnormals, the largest magnitudes), so only a bit-exact reader and writer round-trip
/// them. (Non-finite weights are refused at load: `non_finite_weights_are_refused`.)
fn awkward_params(config: &Config) -> Params {
    let mut params = Params::init(config, 3).unwrap();
    let specials = [-0.0f32, f32::MIN_POSITIVE / 3.0, f32::MAX, -f32::MAX, f32::from_bits(1)];
    for (i, v) in params.as_mut_slice().iter_mut().enumerate() {
        if i % 97 < specials.len() {
            *v = specials[i % 97];
        }
    }
    params
}

fn bits(params: &Params) -> Vec<u32> {
    params.as_slice().iter().map(|v| v.to_bits()).collect()
}

fn floats(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap())).collect()
}

fn tmp(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

#[test]
fn write_then_read_is_bit_exact_in_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let mha = Config { n_kv_heads: 4, ..tiny_gqa(true) };
    for config in [tiny_gqa(true), tiny_gqa(false), mha] {
        let params = awkward_params(&config);
        for version in [Version::V0, Version::V1] {
            let path = tmp(&dir, "model.bin");
            llama2c::write_model(&params, &path, version).unwrap();
            assert_eq!(std::fs::metadata(&path).unwrap().len(), llama2c::file_size(&config, version));
            let (back, found) = llama2c::read_model_with_version(&path).unwrap();
            assert_eq!(found, version);
            assert_eq!(back.config(), &config);
            assert_eq!(bits(&back), bits(&params), "{version:?}, shared {}", config.shared_classifier);
            // And writing what was read reproduces the file byte for byte.
            let again = tmp(&dir, "again.bin");
            llama2c::write_model(&back, &again, version).unwrap();
            assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(&path).unwrap());
        }
    }
}

#[test]
fn non_finite_weights_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_gqa(false);
    for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::from_bits(0x7fc0_1234)] {
        let mut params = Params::init(&config, 3).unwrap();
        params.as_mut_slice()[5] = bad;
        let path = tmp(&dir, "model.bin");
        llama2c::write_model(&params, &path, Version::V1).unwrap();
        let err = llama2c::read_model_with_version(&path).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Format, "{err}");
        assert!(err.to_string().contains("element 5"), "{err}");
    }
}

/// The tensor order of llama2.c export.py, written out by name from its source.
fn export_py_order(config: &Config, version: Version) -> Vec<String> {
    let layers = |kind: &'static str| (0..config.n_layers).map(move |l| format!("layers.{l}.{kind}"));
    let mut names: Vec<String> = Vec::new();
    match version {
        // legacy_export: embedding, then each kind for all layers, final norm, freqs.
        Version::V0 => {
            names.push("token_embedding".into());
            for kind in ["rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3"] {
                names.extend(layers(kind));
            }
            names.push("rms_final".into());
            names.push("FREQ_COS".into());
            names.push("FREQ_SIN".into());
        }
        // version1_export: attention norms, ffn norms, final norm, embedding, matrices.
        Version::V1 => {
            names.extend(layers("rms_att"));
            names.extend(layers("rms_ffn"));
            names.push("rms_final".into());
            names.push("token_embedding".into());
            for kind in ["wq", "wk", "wv", "wo", "w1", "w2", "w3"] {
                names.extend(layers(kind));
            }
        }
    }
    if !config.shared_classifier {
        names.push("wcls".into());
    }
    names
}

#[test]
fn files_follow_export_py_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    for shared in [true, false] {
        let config = tiny_gqa(shared);
        let params = awkward_params(&config);
        for version in [Version::V0, Version::V1] {
            let path = tmp(&dir, "layout.bin");
            llama2c::write_model(&params, &path, version).unwrap();
            let bytes = std::fs::read(&path).unwrap();

            // Header.
            let i32s: Vec<i32> =
                bytes.chunks_exact(4).take(9).map(|b| i32::from_le_bytes(b.try_into().unwrap())).collect();
            let vocab = if shared || version == Version::V1 { 512 } else { -512 };
            let dims = [64, 192, 4, 4, 2, vocab, 16];
            let body = match version {
                Version::V0 => {
                    assert_eq!(&i32s[..7], &dims);
                    28
                }
                Version::V1 => {
                    assert_eq!(&bytes[..4], b"24ka", "magic 0x616b3432, little-endian");
                    assert_eq!(i32s[1], 1, "version");
                    assert_eq!(&i32s[2..9], &dims);
                    assert_eq!(bytes[36], shared as u8);
                    assert!(bytes[37..256].iter().all(|&b| b == 0));
                    256
                }
            };

            // Body: the named tensors in export.py's order.
            let mut expected = Vec::new();
            for name in export_py_order(&config, version) {
                match name.as_str() {
                    "FREQ_COS" | "FREQ_SIN" => {
                        let (cos, sin) = llama2c::freq_cis(&config);
                        let table = if name == "FREQ_COS" { cos } else { sin };
                        assert_eq!(table.len(), config.seq_len * config.head_dim() / 2);
                        expected.extend(table.iter().map(|v| v.to_bits()));
                    }
                    _ => expected.extend(params.by_name(&name).unwrap().iter().map(|v| v.to_bits())),
                }
            }
            assert_eq!(floats(&bytes[body..]), expected, "{version:?} shared {shared}");
        }
    }
}

#[test]
fn freq_cis_are_rope_tables() {
    let config = tiny_gqa(true);
    let (cos, sin) = llama2c::freq_cis(&config);
    let half = config.head_dim() / 2;
    // pos 3, pair 1: angle 3 · 10000^(-2/16).
    let angle = 3.0f64 * 10000f64.powf(-2.0 / 16.0);
    assert!((cos[3 * half + 1] as f64 - angle.cos()).abs() < 1e-6);
    assert!((sin[3 * half + 1] as f64 - angle.sin()).abs() < 1e-6);
}

// ---- Broken model files ----

fn header_v0(fields: [i32; 7]) -> Vec<u8> {
    fields.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn load_error(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> (String, ErrorKind) {
    let path = tmp(dir, name);
    std::fs::write(&path, bytes).unwrap();
    let e = llama2c::read_model(&path).unwrap_err();
    let text = e.to_string();
    assert!(text.starts_with(&path.display().to_string()), "error should name the file: {text}");
    (text, e.kind)
}

#[test]
fn truncated_model_says_how_many_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = tmp(&dir, "model.bin");
    llama2c::write_model(&Params::init(&tiny_gqa(true), 1).unwrap(), &path, Version::V0).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let needed = bytes.len();
    let (text, kind) = load_error(&dir, "cut.bin", &bytes[..needed - 100]);
    assert_eq!(kind, ErrorKind::Format);
    assert!(text.contains("truncated"), "{text}");
    assert!(text.contains(&format!("file has {}", with_commas(needed - 100))), "{text}");
    assert!(text.contains(&format!("needs {} bytes", with_commas(needed))), "{text}");
    // Too long is as wrong as too short (e.g. a classifier the header does not announce).
    let mut long = bytes.clone();
    long.extend_from_slice(&[0; 8]);
    let (text, _) = load_error(&dir, "long.bin", &long);
    assert!(text.contains(&format!("file has {}", with_commas(needed + 8))), "{text}");
    // Shorter than the header itself.
    let (text, _) = load_error(&dir, "stub.bin", &bytes[..10]);
    assert!(text.contains("10 bytes"), "{text}");
}

fn with_commas(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[test]
fn header_disagreeing_with_the_file_length_names_both() {
    let dir = tempfile::tempdir().unwrap();
    // A stories15M header on a 1000-byte file. stories15M.bin is 60,816,028 bytes:
    // 28 + 4 · (15,191,712 parameters + 2 · 256 · 48/2 freq_cis).
    let mut bytes = header_v0([288, 768, 6, 6, 6, 32000, 256]);
    bytes.resize(1000, 0);
    let (text, _) = load_error(&dir, "model.bin", &bytes);
    assert!(text.contains("header says dim 288"), "{text}");
    assert!(text.contains("needs 60,816,028 bytes, file has 1,000"), "{text}");
}

#[test]
fn bad_dimensions_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<([i32; 7], &str)> = vec![
        ([64, 192, 4, -3, 2, 512, 16], "header field n_heads is -3"),
        ([64, 192, 0, 4, 2, 512, 16], "header field n_layers is 0"),
        ([64, 192, 4, 4, 2, 512, -1], "header field seq_len is -1"),
        ([64, 192, 4, 4, 2, 0, 16], "header field vocab_size is 0"),
        ([1 << 30, 192, 4, 4, 2, 512, 16], "dim is 1073741824, above the sanity limit"),
        ([64, 192, 4, 4, 2, 512, i32::MAX], "seq_len is 2147483647, above the sanity limit"),
        ([66, 192, 4, 4, 2, 512, 16], "dim 66 is not divisible by n_heads 4"),
        ([64, 192, 4, 4, 3, 512, 16], "n_heads 4 is not divisible by n_kv_heads 3"),
        ([64, 192, 4, 4, 2, i32::MIN, 16], "header field vocab_size is -2147483648"),
    ];
    for (fields, expected) in cases {
        // Header plus plenty of bytes: the header check must come before any size check.
        let mut bytes = header_v0(fields);
        bytes.resize(bytes.len() + 4096, 0);
        let (text, kind) = load_error(&dir, "model.bin", &bytes);
        assert_eq!(kind, ErrorKind::Format, "{text}");
        assert!(text.contains(expected), "{text} should mention {expected:?}");
    }
}

#[test]
fn bad_v1_headers_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let path = tmp(&dir, "v1.bin");
    llama2c::write_model(&Params::init(&tiny_gqa(true), 1).unwrap(), &path, Version::V1).unwrap();
    let good = std::fs::read(&path).unwrap();

    let mut v2 = good.clone();
    v2[4] = 2;
    let (text, kind) = load_error(&dir, "v2.bin", &v2);
    assert_eq!(kind, ErrorKind::Unsupported);
    assert!(text.contains("version 2 is not supported"), "{text}");

    let mut flag = good.clone();
    flag[36] = 7;
    let (text, _) = load_error(&dir, "flag.bin", &flag);
    assert!(text.contains("shared_classifier is 7"), "{text}");

    let mut negative = good.clone();
    negative[28..32].copy_from_slice(&(-512i32).to_le_bytes());
    let (text, _) = load_error(&dir, "negative.bin", &negative);
    assert!(text.contains("vocab_size is -512"), "{text}");

    let (text, _) = load_error(&dir, "short.bin", &good[..100]);
    assert!(text.contains("shorter than the 256-byte v1 header"), "{text}");

    // A v1 file announcing a separate classifier it does not contain.
    let mut unshared = good.clone();
    unshared[36] = 0;
    let (text, _) = load_error(&dir, "unshared.bin", &unshared);
    assert!(text.contains("separate classifier") && text.contains("file has"), "{text}");
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let e = llama2c::read_model(Path::new("/nonexistent/dir/model.bin")).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Io);
    assert!(e.to_string().starts_with("/nonexistent/dir/model.bin: cannot open"), "{e}");
}

#[test]
fn unrepresentable_models_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = tmp(&dir, "out.bin");
    let biased = Params::init(&Config { qkv_bias: true, ..tiny_gqa(true) }, 1).unwrap();
    let e = llama2c::write_model(&biased, &path, Version::V0).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unsupported);
    assert!(e.to_string().contains("QKV biases"), "{e}");
    let theta = Params::init(&Config { rope_theta: 500_000.0, ..tiny_gqa(true) }, 1).unwrap();
    let e = llama2c::write_model(&theta, &path, Version::V1).unwrap_err();
    assert!(e.to_string().contains("rope_theta 500000"), "{e}");
}

// ---- Tokenizer files ----

fn small_tokenizer() -> Tokenizer {
    let mut pieces: Vec<String> = vec!["<unk>".into(), "\n<s>\n".into(), "\n</s>\n".into()];
    pieces.extend((0..256).map(|b| format!("<0x{b:02X}>")));
    pieces.extend([" ", "a", " a"].map(String::from));
    let scores = (0..pieces.len()).map(|i| -(i as f32)).collect();
    Tokenizer::new(pieces, scores).unwrap()
}

#[test]
fn tokenizer_round_trips_through_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = tmp(&dir, "tok.bin");
    let tok = small_tokenizer();
    tok.write(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(u32::from_le_bytes(bytes[..4].try_into().unwrap()), 6, "max_token_length = len(\"\\n</s>\\n\")");
    let back = Tokenizer::read(&path).unwrap();
    assert_eq!(back, tok);
    assert_eq!(back.encode("a a", true, false), vec![1, 261, 261]);
}

#[test]
fn truncated_tokenizer_file_names_file_and_token() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = small_tokenizer().to_bytes();
    let path = tmp(&dir, "tok-cut.bin");
    std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
    let e = Tokenizer::read(&path).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Format);
    let text = e.to_string();
    assert!(text.starts_with(&path.display().to_string()) && text.contains("token 261"), "{text}");
}

#[test]
fn tokenizer_with_a_negative_length_is_rejected() {
    let mut bytes = small_tokenizer().to_bytes();
    // Token 0's length field sits after max_token_length (4) and its score (4).
    bytes[8..12].copy_from_slice(&(-5i32).to_le_bytes());
    let e = Tokenizer::parse(&bytes).unwrap_err();
    assert!(e.message.contains("token 0 has byte length -5"), "{e}");
}

#[test]
fn tokenizer_vocab_mismatch_names_both_sizes() {
    let e = small_tokenizer().check_vocab(32000).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Mismatch);
    assert!(e.message.contains("tokenizer has 262 tokens, model has 32000"), "{e}");
}
