//! Tokenizer files made by other programs, behind [`AnyTokenizer`]: Llama 2's SentencePiece
//! model and its llama2.c export (../shared/fixtures), and the `tokenizer.json` we write
//! for a llama2.c vocabulary, checked by running it through the Hugging Face `tokenizers`
//! library against llama2.c's encoder. Fails with a clear message when the fixtures are
//! missing.

use std::path::PathBuf;

use llama::tokenizers::{self, AnyTokenizer};
use llama::Tokenizer;
use proptest::prelude::*;

fn fixture(name: &str) -> PathBuf {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures")).join(name);
    assert!(
        path.is_file(),
        "fixture {} is missing: these tests need the shared fixtures folder ../shared/fixtures beside the \
         project root (see its README.md)",
        path.display()
    );
    path
}

#[test]
fn sentencepiece_model_encodes_like_llama2() {
    let tok = AnyTokenizer::open(fixture("llama2-tokenizer.model")).unwrap();
    assert_eq!(tok.kind(), "SentencePiece model");
    assert_eq!(tok.vocab_size(), 32000);
    assert_eq!(tok.encode("Once upon a time", false).unwrap(), [9038, 2501, 263, 931]);
    assert_eq!(tok.encode("Once upon a time", true).unwrap(), [1, 9038, 2501, 263, 931]);
    assert_eq!(tok.decode(&[1, 9038, 2501, 263, 931]).unwrap(), "Once upon a time");
}

#[test]
fn sentencepiece_model_converts_to_llama2cs_tokenizer_bin() {
    // llama2.c's tokenizer.py exported llama2-tokenizer.bin from this very .model.
    let from_model = tokenizers::read_sentencepiece(fixture("llama2-tokenizer.model")).unwrap();
    let exported = Tokenizer::read(fixture("llama2-tokenizer.bin")).unwrap();
    assert_eq!(from_model, exported);
}

#[test]
fn a_file_that_is_not_a_sentencepiece_model_is_refused() {
    let e = tokenizers::parse_sentencepiece(b"\x0a\xff\xff\xff").unwrap_err();
    assert!(e.message.contains("not a SentencePiece model"), "{e}");
}

/// The Hugging Face tokenizers library, loading the tokenizer.json we write for `tok`.
fn via_tokenizer_json(tok: &Tokenizer) -> AnyTokenizer {
    let json = tokenizers::tokenizer_json(tok).unwrap();
    let hf = tokenizers::HfTokenizer::from_bytes(serde_json::to_string(&json).unwrap().as_bytes()).unwrap();
    AnyTokenizer::HuggingFace(Box::new(hf))
}

const STORY: &str = "Once upon a time, there was a little girl named Lily. She loved to play outside in the sunshine. \
    One day, she saw a big, red ball in the park.\n\n\"Can I play?\" she asked. 42 balls — naïve café, 日本語 🙂!";

#[test]
fn tokenizer_json_encodes_like_llama2c_for_both_fixture_vocabularies() {
    for name in ["tok512.bin", "llama2-tokenizer.bin"] {
        let tok = Tokenizer::read(fixture(name)).unwrap();
        let hf = via_tokenizer_json(&tok);
        assert_eq!(hf.vocab_size(), tok.vocab_size(), "{name}");
        assert_eq!(hf.bos_id(), Some(1));
        for text in [STORY, "", " ", "  two  spaces ", "a\tb\n\nc", "Once upon a time"] {
            let want = tok.encode(text, true, false);
            assert_eq!(hf.encode(text, true).unwrap(), want, "{name}: {text:?}");
            assert_eq!(hf.decode(&want).unwrap(), String::from_utf8_lossy(&tok.decode_all(&want).unwrap()), "{name}");
        }
    }
    let llama2 = via_tokenizer_json(&Tokenizer::read(fixture("llama2-tokenizer.bin")).unwrap());
    assert_eq!(llama2.encode("Once upon a time", false).unwrap(), [9038, 2501, 263, 931]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn tokenizer_json_matches_llama2c_on_arbitrary_text(text in "[a-zA-Z .,!?'\n\t0-9éü日本🙂-]{0,60}") {
        thread_local! {
            static PAIR: (Tokenizer, AnyTokenizer) = {
                let tok = Tokenizer::read(fixture("tok512.bin")).unwrap();
                let hf = via_tokenizer_json(&tok);
                (tok, hf)
            };
        }
        PAIR.with(|(tok, hf)| {
            prop_assert_eq!(hf.encode(&text, true).unwrap(), tok.encode(&text, true, false));
            Ok(())
        })?;
    }
}

#[test]
fn open_chooses_the_reader_by_name_and_checks_vocabularies() {
    let bin = AnyTokenizer::open(fixture("tok512.bin")).unwrap();
    assert_eq!((bin.kind(), bin.vocab_size()), ("llama2.c tokenizer.bin", 512));
    bin.check_model_vocab(512).unwrap();
    let e = bin.check_model_vocab(32000).unwrap_err();
    assert!(e.message.contains("tokenizer has 512 tokens, model has 32000"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    let json = tokenizers::tokenizer_json(&Tokenizer::read(fixture("tok512.bin")).unwrap()).unwrap();
    std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
    let hf = AnyTokenizer::open(dir.path()).unwrap();
    assert_eq!((hf.kind(), hf.vocab_size()), ("Hugging Face tokenizer.json", 512));
    hf.check_model_vocab(600).unwrap(); // padded embedding rows are fine
    let e = hf.check_model_vocab(300).unwrap_err();
    assert!(e.message.contains("tokenizer has 512 token ids, the model only 300"), "{e}");

    std::fs::write(&path, "{\"not\": \"a tokenizer\"}").unwrap();
    let e = AnyTokenizer::open(&path).err().unwrap();
    assert!(e.to_string().contains("tokenizer.json") && e.message.contains("not a tokenizer.json"), "{e}");
}

#[test]
fn stream_decoder_holds_back_incomplete_characters() {
    let tok = AnyTokenizer::open(fixture("tok512.bin")).unwrap();
    // "🙂" is not a piece of tok512: byte fallback gives four byte tokens (ids 3..=258).
    let ids = tok.encode("hi 🙂", true).unwrap();
    assert_eq!(ids.iter().filter(|&&id| (3..259).contains(&id)).count(), 4, "{ids:?}");
    let mut stream = tokenizers::StreamDecoder::new(&tok, &ids[..1]).unwrap();
    let mut text = String::new();
    let mut empty_steps = 0;
    for &id in &ids[1..] {
        let piece = stream.push(&tok, id).unwrap();
        empty_steps += piece.is_empty() as usize;
        text += &piece;
    }
    text += &stream.finish(&tok).unwrap();
    assert_eq!(text, "hi 🙂");
    assert!(empty_steps >= 3, "the first three bytes of 🙂 must be held back");
}

/// Hugging Face's byte-fallback decoder rewrites a run of byte tokens as U+FFFDs once it
/// stops being valid UTF-8, so a printed `%` turns into `�`. Found by comparing
/// `anetrain generate` with transformers on a random Qwen2 model: the stream stopped
/// there and printed nothing more. Whatever follows must still come out.
#[test]
fn stream_decoder_goes_on_after_a_byte_run_is_rewritten() {
    let tok = AnyTokenizer::open(fixture("tok512.bin")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let json = tokenizers::tokenizer_json(&Tokenizer::read(fixture("tok512.bin")).unwrap()).unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), serde_json::to_string(&json).unwrap()).unwrap();
    let hf = AnyTokenizer::open(dir.path()).unwrap();
    // The ids transformers and anetrain both generated: "… s" then the byte tokens for
    // 0x25 ('%'), 0x8B, '5', then "ow", three more bytes, then "'" and "c".
    let ids = [1, 403, 407, 261, 378, 364, 443, 387, 262, 40, 142, 56, 327, 234, 214, 42, 102];
    for t in [&tok, &hf] {
        let prompt = 5;
        let mut stream = tokenizers::StreamDecoder::new(t, &ids[..prompt]).unwrap();
        let mut text = String::new();
        for &id in &ids[prompt..] {
            text += &stream.push(t, id).unwrap();
        }
        text += &stream.finish(t).unwrap();
        let whole = t.decode(&ids).unwrap();
        let after_prompt = &whole[t.decode(&ids[..prompt]).unwrap().len()..];
        // Everything after the rewritten run comes out exactly as the whole decode has it.
        let tail = &after_prompt[after_prompt.find("ow").expect("\"ow\" decodes")..];
        assert!(text.ends_with(tail), "{}: streamed {text:?}, whole decode {after_prompt:?}", t.kind());
        assert!(text.starts_with(" you! for s"), "{}: {text:?}", t.kind());
    }
}
