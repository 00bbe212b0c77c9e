//! `anetrain serve` end to end: the real binary on an ephemeral loopback port, spoken to
//! over HTTP (ureq). The model is llama2.c's stories260K (../shared/fixtures), whose
//! greedy text llama2.c itself wrote; other outputs are checked against
//! `llama::reference::forward` (plain fp32 loops, one token at a time) or against the
//! same server answering a request alone.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures");
    assert!(dir.join("stories260K.bin").exists(), "the fixtures folder {} is missing", dir.display());
    dir
}

/// A running `anetrain serve`; killed when dropped (if it has not exited).
struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `anetrain serve` on stories260K with `extra` flags; waits for its address.
fn start(extra: &[&str]) -> Server {
    let f = fixtures();
    let tok = f.join("tok512.bin").display().to_string();
    let mut args = vec!["--tokenizer", &tok];
    args.extend_from_slice(extra);
    start_model(&f.join("stories260K.bin"), &args)
}

/// Starts `anetrain serve --model MODEL` with `extra` flags; waits for its address.
fn start_model(model: &Path, extra: &[&str]) -> Server {
    let mut args: Vec<String> =
        vec!["serve".into(), "--model".into(), model.display().to_string(), "--port".into(), "0".into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_anetrain"))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("anetrain runs");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let base = loop {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            panic!("serve exited before listening:\n{seen}");
        }
        seen.push_str(&line);
        if let Some(rest) = line.strip_prefix("listening on ") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    // Keep draining stderr so the server never blocks on it.
    std::thread::spawn(move || {
        let mut sink = String::new();
        let _ = stderr.read_to_string(&mut sink);
    });
    Server { child, base }
}

/// POSTs JSON; returns (status, body) for any status.
fn post(base: &str, path: &str, body: &Value) -> (u16, Value) {
    post_raw(base, path, &body.to_string())
}

fn post_raw(base: &str, path: &str, body: &str) -> (u16, Value) {
    let r = ureq::post(&format!("{base}{path}")).set("Content-Type", "application/json").send_string(body);
    read_json(r)
}

fn get(base: &str, path: &str) -> (u16, String) {
    match ureq::get(&format!("{base}{path}")).call() {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("GET {path}: {e}"),
    }
}

fn read_json(r: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    let (code, resp) = match r {
        Ok(r) => (r.status(), r),
        Err(ureq::Error::Status(code, r)) => (code, r),
        Err(e) => panic!("request failed: {e}"),
    };
    let text = resp.into_string().unwrap();
    (code, serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}")))
}

/// A streamed request: every `data:` chunk (parsed) until `[DONE]`, which must come.
fn stream(base: &str, path: &str, body: &Value) -> Vec<Value> {
    let r = ureq::post(&format!("{base}{path}"))
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
        .unwrap();
    assert_eq!(r.header("Content-Type"), Some("text/event-stream"));
    let mut chunks = Vec::new();
    for line in BufReader::new(r.into_reader()).lines() {
        let line = line.unwrap();
        if let Some(data) = line.strip_prefix("data: ") {
            if data == "[DONE]" {
                return chunks;
            }
            chunks.push(serde_json::from_str(data).unwrap());
        }
    }
    panic!("the stream ended without data: [DONE]");
}

/// The text of a completion chunk list (`text`) or chat chunk list (`delta.content`).
fn streamed_text(chunks: &[Value], index: u64) -> String {
    chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap().iter())
        .filter(|ch| ch["index"] == index)
        .filter_map(|ch| ch["text"].as_str().or_else(|| ch["delta"]["content"].as_str()))
        .collect()
}

fn finish_reason(chunks: &[Value]) -> String {
    chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap().iter())
        .find_map(|ch| ch["finish_reason"].as_str())
        .expect("a chunk carries the finish reason")
        .to_string()
}

fn completion(base: &str, prompt: &str, max_tokens: usize) -> Value {
    let (code, body) = post(
        base,
        "/v1/completions",
        &json!({"model": "stories260K.bin", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}),
    );
    assert_eq!(code, 200, "{body}");
    body
}

/// llama2.c's greedy text of stories260K (`run -n 256`: 256 forward passes, from BOS
/// at position 0 to position 255, each printing the token it samples: 256 tokens), less
/// the newline `run` prints at the end.
fn llama2c_greedy() -> String {
    let text = std::fs::read_to_string(fixtures().join("stories260K.greedy-256.txt")).unwrap();
    text.strip_suffix('\n').unwrap().to_string()
}

/// The bar: /v1/completions, greedy, empty prompt is exactly llama2.c's text, in one
/// response and as the concatenation of the streamed chunks: all of it with
/// max_tokens 256 (the tokens `run -n 256` prints), all but the last token (a final
/// ".") with 255.
#[test]
fn greedy_completion_is_llama2c_text_streamed_and_not() {
    let s = start(&[]);
    let want = llama2c_greedy();
    let body = completion(&s.base, "", 256);
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["text"].as_str().unwrap(), want);
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"], json!({"prompt_tokens": 1, "completion_tokens": 256, "total_tokens": 257}));
    let body = completion(&s.base, "", 255);
    assert_eq!(body["choices"][0]["text"].as_str().unwrap(), want.strip_suffix('.').unwrap());
    assert_eq!(body["usage"]["completion_tokens"], 255);

    let chunks = stream(
        &s.base,
        "/v1/completions",
        &json!({"prompt": "", "max_tokens": 256, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}),
    );
    assert!(chunks.len() > 100, "one chunk per token or so, got {}", chunks.len());
    assert_eq!(streamed_text(&chunks, 0), want);
    assert_eq!(finish_reason(&chunks), "length");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 256);
}

/// Greedy token ids of `prompt` (BOS first) by the reference forward pass.
fn reference_greedy(params: &llama::Params, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = llama::reference::KvCache::new(params.config());
    let mut tokens = prompt.to_vec();
    let mut logits = Vec::new();
    for (pos, &t) in prompt.iter().enumerate() {
        logits = llama::reference::forward(params, &mut cache, t, pos).unwrap();
    }
    for _ in 0..n {
        let next = llama::sampler::argmax(&logits) as u32;
        if next == 1 || next == 2 {
            break;
        }
        tokens.push(next);
        logits = llama::reference::forward(params, &mut cache, next, tokens.len() - 1).unwrap();
    }
    tokens
}

/// 32 clients at once (some streaming, prompts sharing prefixes so the prefix cache is
/// used, long prompts prefilled in chunks of 8 across steps) each get exactly the text
/// the same request gets alone; and those solo texts are the reference forward pass's.
#[test]
fn concurrent_clients_get_their_solo_output() {
    let s = start(&["--prefill-chunk", "8", "--max-batch", "32"]);
    let stems = ["Once upon a time", "Lily and Tom went to the park", "The cat", "A big red ball", ""];
    let prompts: Vec<String> = (0..32)
        .map(|i| {
            let stem = stems[i % stems.len()];
            if i % 3 == 0 {
                format!("{stem} and then, one sunny day, the little dog ran very fast to see {i}")
            } else {
                format!("{stem}{}", " said".repeat(i % 4))
            }
        })
        .collect();
    let max_tokens = 48;
    let solo: Vec<String> = prompts
        .iter()
        .map(|p| completion(&s.base, p, max_tokens)["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();

    // An independent check of a few solo outputs.
    let f = fixtures();
    let params = llama::llama2c::read_model(f.join("stories260K.bin")).unwrap();
    let tok = llama::Tokenizer::read(f.join("tok512.bin")).unwrap();
    for p in &prompts[..6] {
        let prompt = tok.encode(p, true, false);
        let ids = reference_greedy(&params, &prompt, max_tokens);
        let mut text = Vec::new();
        for w in ids.windows(2).skip(prompt.len() - 1) {
            text.extend_from_slice(tok.decode(w[0], w[1]));
        }
        let i = prompts.iter().position(|q| q == p).unwrap();
        assert_eq!(solo[i], String::from_utf8(text).unwrap(), "prompt {p:?}: server alone vs the reference forward");
    }

    let barrier = std::sync::Barrier::new(prompts.len());
    let together: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (base, barrier) = (&s.base, &barrier);
                scope.spawn(move || {
                    barrier.wait();
                    if i % 2 == 0 {
                        let body = json!({"prompt": p, "max_tokens": max_tokens, "temperature": 0, "stream": true});
                        streamed_text(&stream(base, "/v1/completions", &body), 0)
                    } else {
                        completion(base, p, max_tokens)["choices"][0]["text"].as_str().unwrap().to_string()
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (a, b)) in solo.iter().zip(&together).enumerate() {
        assert_eq!(a, b, "client {i} ({:?}): alone vs among 31 others", prompts[i]);
    }
    // They did run together, and the prefix cache served shared prefixes.
    let (_, metrics) = get(&s.base, "/metrics");
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{metrics}"))
            .parse()
            .unwrap()
    };
    assert!(value("anetrain_batch_rows_total") > 2.0 * value("anetrain_batch_steps_total"), "{metrics}");
    assert!(value("anetrain_prefix_cache_hits_total") > 0.0, "{metrics}");
    assert!(metrics.contains("anetrain_time_to_first_token_seconds_bucket{le=\"+Inf\"}"), "{metrics}");
    assert!(metrics.contains("anetrain_requests_total{endpoint=\"/v1/completions\",status=\"200\"}"), "{metrics}");
}

/// A tokenizer_config.json's chat_template, rendered by minijinja: the chat reply is the
/// completion of the hand-rendered prompt (same text, same prompt tokens), streamed or not.
#[test]
fn chat_template_from_tokenizer_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tokenizer_config.json");
    let template = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] | upper }}\n{% else %}{{ m['role'] | capitalize }}: {{ m['content'].strip() }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}Story:{% endif %}";
    std::fs::write(&config, json!({"bos_token": "<s>", "eos_token": "</s>", "chat_template": template}).to_string())
        .unwrap();
    let s = start(&["--chat-template", config.to_str().unwrap()]);
    let messages = json!([
        {"role": "system", "content": "tell a story"},
        {"role": "user", "content": "  A dog and a ball. "},
    ]);
    let rendered = "TELL A STORY\nUser: A dog and a ball.\nStory:";
    let (code, chat) =
        post(&s.base, "/v1/chat/completions", &json!({"messages": messages, "max_tokens": 40, "temperature": 0}));
    assert_eq!(code, 200, "{chat}");
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["choices"][0]["message"]["role"], "assistant");
    let plain = completion(&s.base, rendered, 40);
    let reply = chat["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!reply.is_empty());
    assert_eq!(reply, plain["choices"][0]["text"].as_str().unwrap());
    assert_eq!(chat["usage"]["prompt_tokens"], plain["usage"]["prompt_tokens"]);

    let chunks = stream(
        &s.base,
        "/v1/chat/completions",
        &json!({"messages": messages, "max_tokens": 40, "temperature": 0, "stream": true}),
    );
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(streamed_text(&chunks, 0), reply);
}

/// A Hugging Face folder (stories260K exported by `anetrain export --to-hf`) serves with
/// its own tokenizer.json and the chat_template of the tokenizer_config.json beside it:
/// completions equal those of the llama2.c file, and the chat reply is the completion of
/// the hand-rendered prompt (the template writes the BOS that a completion's encoding adds).
#[test]
fn hugging_face_folder_with_its_chat_template() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    // export takes the tokenizer.bin beside the model.
    std::fs::copy(fixtures().join("stories260K.bin"), dir.path().join("model.bin")).unwrap();
    std::fs::copy(fixtures().join("tok512.bin"), dir.path().join("tokenizer.bin")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_anetrain"))
        .arg("export")
        .arg(dir.path().join("model.bin"))
        .arg("--to-hf")
        .arg(&hf)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config_path = hf.join("tokenizer_config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["chat_template"] = json!(
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    );
    std::fs::write(&config_path, config.to_string()).unwrap();

    // Named as the file is, so the same requests go to both servers.
    let folder = start_model(&hf, &["--model-name", "stories260K.bin"]);
    let file = start(&[]);
    for prompt in ["Once upon a time", "The cat sat"] {
        let (a, b) = (completion(&folder.base, prompt, 30), completion(&file.base, prompt, 30));
        assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"], "prompt {prompt:?}");
        assert_eq!(a["usage"], b["usage"], "prompt {prompt:?}");
    }
    let messages = json!([{"role": "user", "content": "A dog"}]);
    let (code, chat) =
        post(&folder.base, "/v1/chat/completions", &json!({"messages": messages, "max_tokens": 30, "temperature": 0}));
    assert_eq!(code, 200, "{chat}");
    let plain = completion(&folder.base, "<|user|>A dog<|assistant|>", 30);
    assert_eq!(chat["choices"][0]["message"]["content"], plain["choices"][0]["text"]);
    assert_eq!(chat["usage"]["prompt_tokens"], plain["usage"]["prompt_tokens"]);
}

/// Stop strings, n, seeds and log-probabilities.
#[test]
fn sampling_parameters() {
    let s = start(&[]);
    let full = completion(&s.base, "Once upon a time", 60)["choices"][0]["text"].as_str().unwrap().to_string();
    // Stop at a word in the middle: the text before it, finish_reason stop, streamed too.
    let at = full.len() / 2;
    let stop: String = full[at..].split_whitespace().next().unwrap().to_string();
    let cut = full.find(&stop).unwrap();
    let req = json!({"prompt": "Once upon a time", "max_tokens": 60, "temperature": 0, "stop": ["zzzz", stop]});
    let (code, body) = post(&s.base, "/v1/completions", &req);
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["choices"][0]["text"].as_str().unwrap(), &full[..cut]);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let chunks = stream(&s.base, "/v1/completions", &sreq);
    assert_eq!(streamed_text(&chunks, 0), &full[..cut]);
    assert_eq!(finish_reason(&chunks), "stop");

    // n = 3 with a seed: three choices; the same seed gives the same three again.
    let req = json!({"prompt": "The cat", "max_tokens": 30, "temperature": 1.0, "top_p": 0.9, "seed": 7, "n": 3});
    let (_, a) = post(&s.base, "/v1/completions", &req);
    let (_, b) = post(&s.base, "/v1/completions", &req);
    let texts = |v: &Value| -> Vec<String> {
        v["choices"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(texts(&a).len(), 3);
    assert_eq!(texts(&a), texts(&b));
    assert!(texts(&a)[0] != texts(&a)[1] || texts(&a)[1] != texts(&a)[2], "different seeds per choice: {a}");

    // Chat log-probabilities: greedy picks the top alternative; probabilities ≤ 1.
    let (code, chat) = post(
        &s.base,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0, "logprobs": true, "top_logprobs": 3}),
    );
    assert_eq!(code, 200, "{chat}");
    let content = chat["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), chat["usage"]["completion_tokens"].as_u64().unwrap() as usize);
    for t in content {
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(top[0]["logprob"], t["logprob"], "greedy takes the most likely token: {t}");
        let total: f64 = top.iter().map(|x| x["logprob"].as_f64().unwrap().exp()).sum();
        assert!(total <= 1.0 + 1e-5 && t["logprob"].as_f64().unwrap() <= 0.0, "{t}");
    }
    // Completion log-probabilities (the legacy format).
    let (_, c) =
        post(&s.base, "/v1/completions", &json!({"prompt": "Hi", "max_tokens": 4, "temperature": 0, "logprobs": 2}));
    let lp = &c["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 4, "{c}");
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2, "{c}");

    let (code, models) = get(&s.base, "/v1/models");
    assert_eq!(code, 200);
    assert_eq!(serde_json::from_str::<Value>(&models).unwrap()["data"][0]["id"], "stories260K.bin");
    assert_eq!(get(&s.base, "/health"), (200, r#"{"status":"ok"}"#.to_string()));
}

/// Ten kinds of bad request (and more), each a 4xx with OpenAI's error body; the server
/// answers a good request after every one.
#[test]
fn bad_requests_get_openai_errors_and_the_server_stays_up() {
    let s = start(&["--max-body-bytes", "4096"]);
    let big = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(5000));
    let long_prompt = "the dog ran. ".repeat(200);
    let cases: Vec<(&str, &str, String, u16, Option<&str>)> = vec![
        ("invalid JSON", "/v1/completions", "{\"prompt\": ".into(), 400, None),
        ("unknown model", "/v1/completions", json!({"model": "gpt-9", "prompt": "x"}).to_string(), 404, Some("model")),
        (
            "max_tokens past the context",
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": 600}).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            "negative temperature",
            "/v1/completions",
            json!({"prompt": "x", "temperature": -0.5}).to_string(),
            400,
            Some("temperature"),
        ),
        ("prompt past the context", "/v1/completions", json!({"prompt": long_prompt}).to_string(), 400, Some("prompt")),
        ("body over the limit", "/v1/completions", big, 413, None),
        ("no prompt", "/v1/completions", json!({"max_tokens": 3}).to_string(), 400, Some("prompt")),
        ("top_p above 1", "/v1/completions", json!({"prompt": "x", "top_p": 1.5}).to_string(), 400, Some("top_p")),
        ("n of 0", "/v1/completions", json!({"prompt": "x", "n": 0}).to_string(), 400, Some("n")),
        (
            "five stop strings",
            "/v1/completions",
            json!({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}).to_string(),
            400,
            Some("stop"),
        ),
        ("a wrong type", "/v1/completions", json!({"prompt": "x", "max_tokens": "many"}).to_string(), 400, None),
        (
            "a bad role",
            "/v1/chat/completions",
            json!({"messages": [{"role": "wizard", "content": "x"}]}).to_string(),
            400,
            Some("messages"),
        ),
        ("no messages", "/v1/chat/completions", json!({"messages": []}).to_string(), 400, Some("messages")),
        (
            "too many top_logprobs",
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 50}).to_string(),
            400,
            Some("top_logprobs"),
        ),
        (
            "a prompt token outside the vocabulary",
            "/v1/completions",
            json!({"prompt": [1, 5, 100000]}).to_string(),
            400,
            Some("prompt"),
        ),
        ("an unknown route", "/v1/engines", "{}".into(), 404, None),
    ];
    for (what, path, body, status, param) in &cases {
        let (code, err) = post_raw(&s.base, path, body);
        assert_eq!(code, *status, "{what}: {err}");
        let e = &err["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {err}");
        assert!(e["type"].is_string(), "{what}: {err}");
        assert!(e.get("param").is_some() && e.get("code").is_some(), "{what}: {err}");
        if let Some(p) = param {
            assert_eq!(e["param"], *p, "{what}: {err}");
        }
        let ok = completion(&s.base, "Hi", 3);
        assert_eq!(ok["usage"]["completion_tokens"], 3, "after {what}");
    }
    // A wrong method.
    let (code, body) = get(&s.base, "/v1/completions");
    assert_eq!(code, 405);
    assert!(serde_json::from_str::<Value>(&body).unwrap()["error"]["message"].is_string());
}

/// Reads a counter or gauge from /metrics.
fn metric(base: &str, name: &str) -> f64 {
    let (_, text) = get(base, "/metrics");
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' '))).unwrap().parse().unwrap()
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// With one place in the batch and one in the queue, a third request gets 429; a client
/// that disconnects mid-stream cancels its sequence. The engine is slowed (20 ms per
/// step) so that requests stay in flight.
#[test]
fn full_queue_gets_429_and_a_disconnect_cancels() {
    let s = start(&["--max-batch", "1", "--queue", "1", "--debug-step-delay-ms", "20"]);
    let base = s.base.clone();
    // A: streaming, long; read its first chunk so it is in the batch.
    let a = ureq::post(&format!("{base}/v1/completions"))
        .send_string(
            &json!({"prompt": "", "max_tokens": 200, "temperature": 0, "stream": true, "ignore_eos": true}).to_string(),
        )
        .unwrap();
    let mut a_lines = BufReader::new(a.into_reader()).lines();
    a_lines.next().unwrap().unwrap();
    // B waits in the queue.
    let b = std::thread::spawn(move || completion(&base, "B", 3));
    wait_for("B in the queue", || metric(&s.base, "anetrain_queue_depth") == 1.0);
    let (code, err) = post(&s.base, "/v1/completions", &json!({"prompt": "C", "max_tokens": 3}));
    assert_eq!(code, 429, "{err}");
    assert_eq!(err["error"]["code"], "queue_full");
    // A goes away: its sequence is cancelled, and B runs.
    drop(a_lines);
    wait_for("A cancelled", || metric(&s.base, "anetrain_sequences_cancelled_total") == 1.0);
    let b = b.join().unwrap();
    assert_eq!(b["usage"]["completion_tokens"], 3);
    assert_eq!(metric(&s.base, "anetrain_active_sequences"), 0.0);
}

/// SIGINT (Ctrl-C) while a stream is in flight: the stream still completes, then the
/// server exits with status 0.
#[cfg(unix)]
#[test]
fn ctrl_c_drains_requests_in_flight() {
    let mut s = start(&["--debug-step-delay-ms", "20"]);
    let r = ureq::post(&format!("{}/v1/completions", s.base))
        .send_string(
            &json!({"prompt": "", "max_tokens": 30, "temperature": 0, "stream": true, "ignore_eos": true}).to_string(),
        )
        .unwrap();
    let mut lines = BufReader::new(r.into_reader()).lines();
    lines.next().unwrap().unwrap();
    let status = Command::new("kill").args(["-INT", &s.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert_eq!(rest.iter().rev().find(|l| !l.is_empty()).map(String::as_str), Some("data: [DONE]"));
    let finish = rest
        .iter()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|c| c["choices"][0]["finish_reason"].as_str().map(str::to_string));
    assert_eq!(finish.as_deref(), Some("length"));
    let start = Instant::now();
    let code = loop {
        if let Some(status) = s.child.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "the server did not exit after Ctrl-C");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(code.success(), "{code}");
}

/// `serve --lora DIR` answers greedy requests with the text `sample --lora DIR` prints for
/// the same prompt and length (both apply the adapter merged at load), and that text is
/// not the base model's (the adapter's B is far from zero, so the test can fail).
#[test]
fn serve_with_a_lora_adapter_gives_the_text_of_sample_with_it() {
    use rand::{Rng, SeedableRng};
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    let params = llama::llama2c::read_model(f.join("stories260K.bin")).unwrap();
    let cfg = train::lora::LoraConfig {
        targets: train::lora::LoraConfig::parse_targets("q,v,down").unwrap(),
        alpha: 16.0,
        ..train::lora::LoraConfig::new(4)
    };
    let mut lora = train::lora::LoraParams::init(params.config(), &cfg, 3);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    for s in lora.slots().to_vec() {
        for v in &mut lora.as_mut_slice()[s.b] {
            *v = rng.gen_range(-0.5f32..0.5);
        }
    }
    train::peft::write_adapter(&adapter, params.config(), &lora, None).unwrap();
    let adapter_arg = adapter.display().to_string();
    let sample = |lora: bool| {
        let (model, tok) = (f.join("stories260K.bin"), f.join("tok512.bin"));
        let mut args: Vec<String> =
            ["sample", "--device", "cpu", "--temperature", "0", "--steps", "48", "--prompt", ""]
                .map(String::from)
                .to_vec();
        args.extend(["--model".into(), model.display().to_string(), "--tokenizer".into(), tok.display().to_string()]);
        if lora {
            args.extend(["--lora".into(), adapter_arg.clone()]);
        }
        let out = Command::new(env!("CARGO_BIN_EXE_anetrain")).args(&args).output().unwrap();
        assert!(out.status.success(), "sample failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().strip_suffix('\n').unwrap().to_string()
    };
    let (with, without) = (sample(true), sample(false));
    assert_ne!(with, without, "the adapter must change the greedy text");
    let s = start(&["--lora", &adapter_arg]);
    let body = completion(&s.base, "", 48);
    assert_eq!(body["choices"][0]["text"].as_str().unwrap(), with, "serve --lora against sample --lora");
    drop(s);
    // A folder that is not an adapter is named in the error.
    let out = Command::new(env!("CARGO_BIN_EXE_anetrain"))
        .args(["serve", "--port", "0", "--lora", "/nonexistent-adapter", "--model"])
        .arg(f.join("stories260K.bin"))
        .arg("--tokenizer")
        .arg(f.join("tok512.bin"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve with a missing adapter must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--lora /nonexistent-adapter"), "the error must name the flag and folder: {err}");
}
