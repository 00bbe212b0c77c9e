//! Chat data against Hugging Face transformers: `tests/data/chat/expected.json` holds what
//! `apply_chat_template(…, return_dict=True, return_assistant_tokens_mask=True)` renders,
//! tokenizes and masks for `conversations.jsonl` with the tokenizer and ChatML template
//! beside it (made by `tests/data/chat/make_fixture.py`). The renderer must agree on the
//! text, every token id and every mask bit, by the template's `{% generation %}` tags and
//! by the prefix rule with the tags removed.

use std::path::{Path, PathBuf};

use llama::chat::{ChatTemplate, Message};
use llama::tokenizers::AnyTokenizer;
use train::chat_data::{self, ChatFormat};
use train::data::{Dataset, HoldOut, Sampler, TokenWidth, IGNORE_TARGET};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/chat")
}

#[derive(serde::Deserialize)]
struct Expected {
    text: String,
    input_ids: Vec<u32>,
    assistant_masks: Vec<u8>,
}

fn expected() -> Vec<Expected> {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("expected.json")).unwrap()).unwrap()
}

fn conversations() -> Vec<Vec<Message>> {
    chat_data::read_jsonl(&fixture().join("conversations.jsonl")).unwrap().into_iter().map(|(_, m)| m).collect()
}

fn check_against_transformers(format: &ChatFormat) {
    let tokenizer = AnyTokenizer::open(fixture().join("tokenizer.json")).unwrap();
    let convs = conversations();
    let want = expected();
    assert_eq!(convs.len(), want.len());
    for (i, (messages, want)) in convs.iter().zip(&want).enumerate() {
        let (text, _) = chat_data::render(format, messages).unwrap();
        assert_eq!(text, want.text, "conversation {i}: rendering");
        let got = chat_data::encode(&tokenizer, format, messages).unwrap();
        assert_eq!(got.tokens, want.input_ids, "conversation {i}: token ids");
        assert_eq!(got.mask, want.assistant_masks, "conversation {i}: assistant mask");
        assert!(got.mask.contains(&1), "conversation {i} has assistant tokens");
    }
}

#[test]
fn generation_tags_match_transformers_assistant_mask() {
    let template = ChatTemplate::from_tokenizer_config(&fixture().join("tokenizer_config.json")).unwrap().unwrap();
    assert!(template.has_generation_markers());
    check_against_transformers(&ChatFormat::Template(Box::new(template)));
}

#[test]
fn prefix_rule_without_tags_matches_transformers_assistant_mask() {
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("tokenizer_config.json")).unwrap()).unwrap();
    let source =
        config["chat_template"].as_str().unwrap().replace("{% generation %}", "").replace("{% endgeneration %}", "");
    let template = ChatTemplate::new(source, String::new(), "<|im_end|>".into()).unwrap();
    assert!(!template.has_generation_markers());
    check_against_transformers(&ChatFormat::Template(Box::new(template)));
}

#[test]
fn a_template_that_rewrites_earlier_turns_is_refused_by_line() {
    // Like Qwen3's: earlier assistant turns are rendered without their content, so the
    // prefix through a reply is not a prefix of the whole conversation.
    let source = "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' and not loop.last %}…{% else %}{{ m.content }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
    let template = ChatTemplate::new(source.into(), String::new(), String::new()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("chats.jsonl");
    std::fs::write(
        &input,
        "\n{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}, {\"role\": \"user\", \"content\": \"c\"}, {\"role\": \"assistant\", \"content\": \"d\"}]}\n",
    )
    .unwrap();
    let tokenizer = AnyTokenizer::open(fixture().join("tokenizer.json")).unwrap();
    let err = chat_data::chat_files(
        &tokenizer,
        &ChatFormat::Template(Box::new(template)),
        &[input],
        dir.path(),
        TokenWidth::U16,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("chats.jsonl:2: messages[1] (assistant)") && err.contains("generation"), "{err}");

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}\n{\"messages\": [{\"role\": \"user\"}]}\n",
    )
    .unwrap();
    let err = chat_data::read_jsonl(&bad).unwrap_err().to_string();
    assert!(err.ends_with("bad.jsonl:2: messages[0].content: missing"), "{err}");
}

#[test]
fn chat_shards_train_only_on_assistant_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = AnyTokenizer::open(fixture().join("tokenizer.json")).unwrap();
    let template = ChatTemplate::from_tokenizer_config(&fixture().join("tokenizer_config.json")).unwrap().unwrap();
    let format = ChatFormat::Template(Box::new(template));
    // u32 even though the vocabulary fits u16: the headed layout both ways.
    for width in [TokenWidth::U16, TokenWidth::U32] {
        let out = dir.path().join(width.to_string());
        let summaries =
            chat_data::chat_files(&tokenizer, &format, &[fixture().join("conversations.jsonl")], &out, width).unwrap();
        let want = expected();
        let all_ids: Vec<u32> = want.iter().flat_map(|e| e.input_ids.clone()).collect();
        let all_mask: Vec<u8> = want.iter().flat_map(|e| e.assistant_masks.clone()).collect();
        assert_eq!(summaries[0].tokens, all_ids.len());
        assert_eq!(summaries[0].loss_tokens, all_mask.iter().filter(|&&m| m == 1).count());
        let bytes = std::fs::read(&summaries[0].output).unwrap();
        assert_eq!(&bytes[..8], train::data::SHARD_MAGIC);

        // Every window's targets are the token, or IGNORE where the token is not the
        // assistant's: checked against the flat transformers lists.
        let seq = 16;
        let splits = Dataset::open(&[summaries[0].output.clone()], &HoldOut::Fraction(0.0), 400, seq).unwrap();
        assert!(splits.train.is_masked());
        let mut sampler = Sampler::new(3);
        let (mut inputs, mut targets) = (vec![0u32; 4 * seq], vec![0u32; 4 * seq]);
        let target_at = |pos: usize| if all_mask[pos] == 1 { all_ids[pos] } else { IGNORE_TARGET };
        let (mut ignored, mut counted) = (0, 0);
        for _ in 0..20 {
            splits.train.sample_batch(&mut sampler, &mut inputs, &mut targets);
            for (row_in, row_t) in inputs.chunks(seq).zip(targets.chunks(seq)) {
                // Some window of the stream has these inputs and exactly these targets.
                let found = (0..all_ids.len() - seq)
                    .any(|p| all_ids[p..p + seq] == *row_in && (0..seq).all(|s| row_t[s] == target_at(p + s + 1)));
                assert!(found, "window {row_in:?} → {row_t:?}");
                ignored += row_t.iter().filter(|&&t| t == IGNORE_TARGET).count();
                counted += row_t.iter().filter(|&&t| t != IGNORE_TARGET).count();
            }
        }
        assert!(ignored > 0 && counted > 0, "{ignored} ignored, {counted} counted");
        // A model too small for the tokens is refused, naming the file and offset.
        let err = Dataset::open(&[summaries[0].output.clone()], &HoldOut::Fraction(0.0), 100, seq).unwrap_err();
        let first = all_ids.iter().position(|&t| t >= 100).unwrap();
        let msg = err.to_string();
        assert!(msg.contains("conversations.bin") && msg.contains(&format!("token offset {first}")), "{msg}");
    }
}

#[test]
fn plain_format_for_models_without_a_template() {
    let tokenizer =
        AnyTokenizer::open(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/tok512.bin")).unwrap();
    let messages = [Message::new("user", "Hi there"), Message::new("assistant", "Hello friend")];
    let got = chat_data::encode(&tokenizer, &ChatFormat::Plain, &messages).unwrap();
    // BOS, then the text; the reply and the final EOS are the loss tokens.
    assert_eq!(got.tokens[0], 1);
    assert_eq!(*got.tokens.last().unwrap(), 2);
    let first = got.mask.iter().position(|&m| m == 1).unwrap();
    let prompt = tokenizer.encode("user: Hi there\nassistant:", true).unwrap();
    assert_eq!(got.tokens[..first], prompt[..first]);
    let reply = tokenizer.decode(&got.tokens[first..got.tokens.len() - 1]).unwrap();
    assert!(reply.contains("Hello friend") && !reply.contains("assistant"), "{reply:?}");
    assert!(got.mask[first..].iter().all(|&m| m == 1));
}
