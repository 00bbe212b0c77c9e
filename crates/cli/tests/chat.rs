//! Chat fine-tuning end to end with the real binary: `data chat` renders JSONL with a
//! folder's chat template into masked shards, `train` (full and LoRA) trains on them and
//! reports the assistant tokens its loss counted, `data pretokenize` writes u32 shards
//! for a vocabulary beyond u16, and bad input is named by file, line and field.

use std::path::{Path, PathBuf};

mod common;
use common::{anetrain, failed_with, ok};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures").join(name)
}

/// A ChatML-like template in plain words (the exported tok512 vocabulary has no
/// special tokens), with `{% generation %}` tags around the assistant's reply.
const TEMPLATE: &str = "{% for m in messages %}{{ m.role }}: {% if m.role == 'assistant' %}{% generation %}{{ m.content }}.{% endgeneration %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}";

fn chats(n: usize) -> String {
    let names = ["Lily", "Tom", "Sue", "Ben", "Max"];
    (0..n)
        .map(|i| {
            let name = names[i % names.len()];
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("Who is {name}?")},
                {"role": "assistant", "content": format!("{name} is a little girl who likes to play in the park")},
                {"role": "user", "content": "And then?"},
                {"role": "assistant", "content": format!("Then {name} went home and slept")},
            ]})
            .to_string()
                + "\n"
        })
        .collect()
}

fn step_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "step")
        .collect()
}

#[test]
fn chat_data_trains_full_and_lora_on_assistant_tokens_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::copy(fixture("stories260K.bin"), d.join("stories260K.bin")).unwrap();
    std::fs::copy(fixture("tok512.bin"), d.join("tokenizer.bin")).unwrap();
    ok(&anetrain(d, &["export", "stories260K.bin", "--to-hf", "hf"]));
    let config_path = d.join("hf/tokenizer_config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["chat_template"] = TEMPLATE.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    std::fs::write(d.join("chats.jsonl"), chats(60)).unwrap();

    let out = anetrain(d, &["data", "chat", "--tokenizer", "hf", "--in", "chats.jsonl", "--out", "shards"]);
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("60 conversations") && stderr.contains("assistant's"), "{stderr}");
    let shard = std::fs::read(d.join("shards/chats.bin")).unwrap();
    assert_eq!(&shard[..8], train::data::SHARD_MAGIC);

    let common = ["--data", "shards/chats.bin", "--steps", "3", "--batch", "2", "--seq", "64", "--sample-steps", "0"];
    let common = [&common[..], &["--quiet", "--device", "cpu", "--eval-every", "0"]].concat();
    let mut full = vec!["train", "--init", "hf", "--telemetry", "full.jsonl", "--ckpt", "full/ckpt.bin"];
    full.extend(&common);
    ok(&anetrain(d, &full));
    let mut lora =
        vec!["train", "--model", "hf", "--lora", "4", "--telemetry", "lora.jsonl", "--ckpt", "lora/ckpt.bin"];
    lora.extend(&common);
    ok(&anetrain(d, &lora));
    for file in ["full.jsonl", "lora.jsonl"] {
        let steps = step_lines(&d.join(file));
        assert_eq!(steps.len(), 3, "{file}");
        for s in &steps {
            // Of 2 × 64 targets, the prompts' tokens are not counted.
            let n = s["loss_tokens"].as_u64().unwrap();
            assert!(n > 10 && n < 128, "{file}: {n} loss tokens");
            assert!(s["loss"].as_f64().unwrap().is_finite());
        }
    }
}

#[test]
fn bad_chat_input_is_named_by_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::copy(fixture("tok512.bin"), d.join("tok512.bin")).unwrap();
    std::fs::write(d.join("bad.jsonl"), "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n\n{\"messages\": [{\"role\": \"user\", \"content\": 3}]}\n").unwrap();
    let out = anetrain(d, &["data", "chat", "--tokenizer", "tok512.bin", "--in", "bad.jsonl", "--out", "o"]);
    failed_with(&out, &["bad.jsonl:3: messages[0].content: expected a string, found 3"]);
    std::fs::write(d.join("no.json"), "{}").unwrap();
    let out = anetrain(
        d,
        &["data", "chat", "--tokenizer", "tok512.bin", "--chat-template", "no.json", "--in", "bad.jsonl", "--out", "o"],
    );
    failed_with(&out, &["--chat-template no.json", "no chat_template"]);
}

#[test]
fn pretokenize_writes_u32_shards_for_a_vocabulary_beyond_u16() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A word-level tokenizer.json whose ids reach past 65 535 (as Qwen's 151 936 do).
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false,
                          "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"<s>": 0, "[UNK]": 1, "once": 70000, "upon": 5, "a": 65536, "time": 151935},
                  "unk_token": "[UNK]"}
    });
    std::fs::write(d.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    std::fs::write(d.join("story.txt"), "once upon a time\n\nupon a time once\n").unwrap();
    ok(&anetrain(d, &["data", "pretokenize", "--tokenizer", "tokenizer.json", "--in", "story.txt", "--out", "s"]));
    let bytes = std::fs::read(d.join("s/story.bin")).unwrap();
    assert_eq!(&bytes[..8], train::data::SHARD_MAGIC);
    let ids: Vec<u32> = bytes[32..].chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(ids, [0, 70000, 5, 65536, 151935, 0, 5, 65536, 151935, 70000]);
    // Forcing u16 is refused by name.
    let out = anetrain(
        d,
        &["data", "pretokenize", "--tokenizer", "tokenizer.json", "--in", "story.txt", "--out", "t", "--width", "u16"],
    );
    failed_with(&out, &["--width u16", "151936 token ids"]);
}
