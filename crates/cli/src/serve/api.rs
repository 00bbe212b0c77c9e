//! The HTTP side of `anetrain serve`: OpenAI's routes, request checks, responses and
//! Server-Sent Events. Every error is OpenAI's body,
//! `{"error": {"message", "type", "param", "code"}}`, with a 4xx status for the
//! client's mistakes.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use llama::tokenizers::AnyTokenizer;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::engine::{EngineHandle, Event, GenParams, Job, TokenLogprob};
use super::metrics::Metrics;
use super::template::{self, ChatTemplate, Message};

/// What the handlers share.
pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Arc<AnyTokenizer>,
    pub template: Option<ChatTemplate>,
    /// The model's name in requests and responses.
    pub name: String,
    /// Positions a sequence may fill (prompt and new tokens).
    pub context: usize,
    pub max_body: usize,
    pub max_n: usize,
    pub metrics: Arc<Metrics>,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// An OpenAI error.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn invalid(param: Option<&'static str>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    fn code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    fn status(mut self, status: StatusCode) -> ApiError {
        self.status = status;
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}});
        (self.status, Json(body)).into_response()
    }
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    st.metrics.request("/metrics", 200);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], st.metrics.render()).into_response()
}

async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    st.metrics.request("/v1/models", 200);
    Json(json!({"object": "list", "data": [{"id": st.name, "object": "model", "created": 0, "owned_by": "anetrain"}]}))
}

async fn not_found(State(st): State<Arc<AppState>>, req: Request) -> Response {
    st.metrics.request("other", 404);
    let message = format!(
        "no route {} {}: the routes are /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics",
        req.method(),
        req.uri().path()
    );
    ApiError::invalid(None, message).status(StatusCode::NOT_FOUND).code("unknown_url").into_response()
}

async fn method_not_allowed(State(st): State<Arc<AppState>>, req: Request) -> Response {
    st.metrics.request("other", 405);
    let message = format!("{} is not allowed on {}", req.method(), req.uri().path());
    ApiError::invalid(None, message).status(StatusCode::METHOD_NOT_ALLOWED).code("method_not_allowed").into_response()
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

async fn completions(State(st): State<Arc<AppState>>, req: Request) -> Response {
    respond(&st, "/v1/completions", handle(&st, Kind::Completion, req).await)
}

async fn chat_completions(State(st): State<Arc<AppState>>, req: Request) -> Response {
    respond(&st, "/v1/chat/completions", handle(&st, Kind::Chat, req).await)
}

fn respond(st: &AppState, endpoint: &str, result: Result<Response, ApiError>) -> Response {
    let response = result.unwrap_or_else(IntoResponse::into_response);
    st.metrics.request(endpoint, response.status().as_u16());
    response
}

/// `stop`: a string or a list of strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields both endpoints read (others are accepted and ignored, as OpenAI-style
/// servers do).
#[derive(Deserialize)]
struct Body {
    model: Option<String>,
    prompt: Option<Value>,
    messages: Option<Value>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<i64>,
    n: Option<i64>,
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    logprobs: Option<Value>,
    top_logprobs: Option<i64>,
    /// vLLM's extension: keep generating past end-of-text (for benchmarks).
    #[serde(default)]
    ignore_eos: bool,
}

/// Most alternatives per token: OpenAI's limits (5 for completions, 20 for chat).
const MAX_TOP_LOGPROBS_COMPLETION: i64 = 5;
const MAX_TOP_LOGPROBS_CHAT: i64 = 20;
const MAX_STOPS: usize = 4;

async fn handle(st: &Arc<AppState>, kind: Kind, req: Request) -> Result<Response, ApiError> {
    let too_large = || {
        ApiError::invalid(None, format!("the request body is larger than the limit of {} bytes", st.max_body))
            .status(StatusCode::PAYLOAD_TOO_LARGE)
            .code("request_too_large")
    };
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > st.max_body) {
        return Err(too_large());
    }
    let bytes = axum::body::to_bytes(req.into_body(), st.max_body).await.map_err(|_| too_large())?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid(None, format!("the body is not valid JSON: {e}")).code("invalid_json"))?;
    if !value.is_object() {
        return Err(ApiError::invalid(None, "the body must be a JSON object"));
    }
    let body: Body =
        serde_json::from_value(value).map_err(|e| ApiError::invalid(None, format!("invalid request: {e}")))?;
    if let Some(model) = &body.model {
        if model != &st.name {
            return Err(ApiError::invalid(
                Some("model"),
                format!("the model `{model}` does not exist; this server has `{}`", st.name),
            )
            .status(StatusCode::NOT_FOUND)
            .code("model_not_found"));
        }
    }
    let prompt = match kind {
        Kind::Completion => completion_prompt(st, body.prompt.as_ref())?,
        Kind::Chat => chat_prompt(st, body.messages.as_ref())?,
    };
    let prompt_param = if kind == Kind::Chat { "messages" } else { "prompt" };
    if prompt.len() >= st.context {
        return Err(ApiError::invalid(
            Some(prompt_param),
            format!(
                "the prompt is {} tokens; the context is {} tokens, so no room is left to generate",
                prompt.len(),
                st.context
            ),
        )
        .code("context_length_exceeded"));
    }
    let params = gen_params(st, kind, &body, prompt.len())?;
    let include_usage = body.stream_options.as_ref().is_some_and(|o| o.include_usage);
    st.metrics.prompt_tokens.fetch_add(prompt.len(), Ordering::Relaxed);

    let (tx, rx) = mpsc::unbounded_channel();
    let n = params.n;
    let logprobs = params.logprobs.is_some();
    let job = Job { prompt: prompt.clone(), params, events: tx, received: Instant::now() };
    if st.engine.submit(job).is_err() {
        return Err(ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: "the server is busy: its request queue is full; retry later".into(),
            kind: "rate_limit_exceeded",
            param: None,
            code: Some("queue_full"),
        });
    }
    let meta = Meta {
        id: next_id(kind),
        created: now_secs(),
        model: st.name.clone(),
        kind,
        n,
        prompt_tokens: prompt.len(),
        logprobs,
    };
    if body.stream {
        Ok(stream(meta, rx, include_usage))
    } else {
        collect(meta, rx).await
    }
}

fn completion_prompt(st: &AppState, prompt: Option<&Value>) -> Result<Vec<u32>, ApiError> {
    let bad = |m: &str| ApiError::invalid(Some("prompt"), m.to_string());
    let encode =
        |text: &str| st.tokenizer.encode_prompt(text).map_err(|e| bad(&format!("cannot encode the prompt: {e}")));
    match prompt {
        None => Err(bad("`prompt` is required")),
        Some(Value::String(s)) => encode(s),
        Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
            encode(items[0].as_str().unwrap_or(""))
        }
        Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_number) => {
            let vocab = st.tokenizer.vocab_size() as u64;
            items
                .iter()
                .map(|v| match v.as_u64() {
                    Some(id) if id < vocab => Ok(id as u32),
                    _ => Err(bad(&format!("token {v} is not an id of the {vocab}-token vocabulary"))),
                })
                .collect()
        }
        Some(_) => Err(bad("`prompt` must be a string, a list of one string, or a list of token ids")),
    }
}

fn chat_prompt(st: &AppState, messages: Option<&Value>) -> Result<Vec<u32>, ApiError> {
    let bad = |m: String| ApiError::invalid(Some("messages"), m);
    let Some(Value::Array(items)) = messages else {
        return Err(bad("`messages` is required: a list of {role, content}".into()));
    };
    if items.is_empty() {
        return Err(bad("`messages` is empty".into()));
    }
    let mut msgs = Vec::new();
    for (i, m) in items.iter().enumerate() {
        let role =
            m.get("role").and_then(Value::as_str).ok_or_else(|| bad(format!("messages[{i}] has no string `role`")))?;
        if !["system", "developer", "user", "assistant", "tool"].contains(&role) {
            return Err(bad(format!(
                "messages[{i}].role `{role}` is not one of system, developer, user, assistant, tool"
            )));
        }
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None if role == "assistant" => String::new(),
            // A list of parts: the text parts, joined.
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => return Err(bad(format!("messages[{i}].content: only text parts are supported"))),
                    }
                }
                text
            }
            _ => return Err(bad(format!("messages[{i}] has no string `content`"))),
        };
        msgs.push(Message { role: role.to_string(), content });
    }
    let text = match &st.template {
        Some(t) => t.render(&msgs).map_err(bad)?,
        None => template::plain(&msgs),
    };
    let encode_err = |e: llama::Error| bad(format!("cannot encode the chat prompt: {e}"));
    match (&*st.tokenizer, &st.template) {
        // A tokenizer.json: the template writes the special tokens itself.
        (AnyTokenizer::HuggingFace(_), _) => {
            let ids = st.tokenizer.encode(&text, false).map_err(encode_err)?;
            if ids.is_empty() {
                return Err(bad("the chat prompt is empty".into()));
            }
            Ok(ids)
        }
        // llama2.c's tokenizer spells BOS as an id, not as text: a template's leading
        // bos_token becomes the id.
        (_, t) => {
            let bos = t.as_ref().map_or("", |t| t.bos_token.as_str());
            let text = if bos.is_empty() { &text[..] } else { text.strip_prefix(bos).unwrap_or(&text) };
            st.tokenizer.encode(text, true).map_err(encode_err)
        }
    }
}

fn gen_params(st: &AppState, kind: Kind, body: &Body, prompt_len: usize) -> Result<GenParams, ApiError> {
    let temperature = body.temperature.unwrap_or(1.0);
    if !temperature.is_finite() || !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            Some("temperature"),
            format!("temperature {temperature} must be between 0 and 2"),
        ));
    }
    let top_p = body.top_p.unwrap_or(1.0);
    if !top_p.is_finite() || !(0.0..=1.0).contains(&top_p) {
        return Err(ApiError::invalid(Some("top_p"), format!("top_p {top_p} must be between 0 and 1")));
    }
    let n = body.n.unwrap_or(1);
    if n < 1 || n > st.max_n as i64 {
        return Err(ApiError::invalid(Some("n"), format!("n {n} must be between 1 and {}", st.max_n)));
    }
    let room = st.context - prompt_len;
    let (max_tokens, param) = match (body.max_completion_tokens, body.max_tokens) {
        (Some(m), _) => (Some(m), "max_completion_tokens"),
        (None, m) => (m, "max_tokens"),
    };
    let max_tokens = match max_tokens {
        // OpenAI's default for completions is 16 tokens; chat replies run to the context.
        None => if kind == Kind::Completion { 16.min(room) } else { room },
        Some(m) if m < 1 => return Err(ApiError::invalid(Some(param), format!("{param} {m} must be at least 1"))),
        Some(m) if m as u64 > room as u64 => {
            return Err(ApiError::invalid(
                Some(param),
                format!(
                    "{param} {m} is past the context: the prompt is {prompt_len} tokens and the context {} tokens, so at most {room} new tokens fit",
                    st.context
                ),
            )
            .code("context_length_exceeded"))
        }
        Some(m) => m as usize,
    };
    let stop = match &body.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > MAX_STOPS || stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(Some("stop"), format!("stop must be at most {MAX_STOPS} non-empty strings")));
    }
    let logprobs = match kind {
        Kind::Completion => match &body.logprobs {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_i64() {
                Some(k) if (0..=MAX_TOP_LOGPROBS_COMPLETION).contains(&k) => Some(k as usize),
                _ => {
                    return Err(ApiError::invalid(
                        Some("logprobs"),
                        format!("logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS_COMPLETION}"),
                    ))
                }
            },
        },
        Kind::Chat => {
            let on = match &body.logprobs {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(ApiError::invalid(Some("logprobs"), "logprobs must be true or false")),
            };
            match body.top_logprobs {
                Some(k) if !(0..=MAX_TOP_LOGPROBS_CHAT).contains(&k) => {
                    return Err(ApiError::invalid(
                        Some("top_logprobs"),
                        format!("top_logprobs must be from 0 to {MAX_TOP_LOGPROBS_CHAT}"),
                    ))
                }
                Some(_) if !on => {
                    return Err(ApiError::invalid(Some("top_logprobs"), "top_logprobs needs logprobs: true"))
                }
                k => on.then_some(k.unwrap_or(0) as usize),
            }
        }
    };
    let seed = match body.seed {
        Some(s) => s as u64,
        // As llama2.c: the time, when no seed is given.
        None => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64),
    };
    Ok(GenParams {
        max_tokens,
        temperature: temperature as f32,
        top_p: top_p as f32,
        seed,
        n: n as usize,
        stop,
        logprobs,
        ignore_eos: body.ignore_eos,
    })
}

/// What a response repeats in every chunk.
struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    n: usize,
    prompt_tokens: usize,
    logprobs: bool,
}

impl Meta {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    fn usage(&self, completion: usize) -> Value {
        json!({"prompt_tokens": self.prompt_tokens, "completion_tokens": completion, "total_tokens": self.prompt_tokens + completion})
    }

    fn envelope(&self, chunk: bool, choices: Vec<Value>) -> Value {
        json!({"id": self.id, "object": self.object(chunk), "created": self.created, "model": self.model, "choices": choices})
    }

    /// Log-probabilities in the endpoint's format; `offset`: text before these tokens.
    fn logprobs(&self, lps: &[TokenLogprob], offset: usize) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        match self.kind {
            Kind::Completion => {
                let mut off = offset;
                let mut offsets = Vec::new();
                for lp in lps {
                    offsets.push(off);
                    off += lp.token.len();
                }
                json!({
                    "tokens": lps.iter().map(|l| &l.token).collect::<Vec<_>>(),
                    "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
                    "top_logprobs": lps.iter().map(|l| l.top.iter().map(|(t, p)| (t.clone(), json!(p))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
                    "text_offset": offsets,
                })
            }
            Kind::Chat => {
                let entry = |t: &str, p: f32| json!({"token": t, "logprob": p, "bytes": t.as_bytes()});
                let content: Vec<Value> = lps
                    .iter()
                    .map(|l| {
                        let mut e = entry(&l.token, l.logprob);
                        e["top_logprobs"] = l.top.iter().map(|(t, p)| entry(t, *p)).collect();
                        e
                    })
                    .collect();
                json!({"content": content})
            }
        }
    }
}

/// Waits for every choice and answers with one JSON object.
async fn collect(meta: Meta, mut rx: mpsc::UnboundedReceiver<Event>) -> Result<Response, ApiError> {
    let mut texts = vec![String::new(); meta.n];
    let mut lps: Vec<Vec<TokenLogprob>> = (0..meta.n).map(|_| Vec::new()).collect();
    let mut finish: Vec<Option<(&'static str, usize)>> = vec![None; meta.n];
    while finish.iter().any(Option::is_none) {
        match rx.recv().await {
            Some(Event::Text { index, text, logprobs }) => {
                texts[index].push_str(&text);
                lps[index].extend(logprobs);
            }
            Some(Event::Done { index, finish_reason, completion_tokens }) => {
                finish[index] = Some((finish_reason, completion_tokens))
            }
            None => {
                return Err(ApiError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    message: "the engine stopped before the reply was complete".into(),
                    kind: "server_error",
                    param: None,
                    code: None,
                })
            }
        }
    }
    let mut completion = 0;
    let choices: Vec<Value> = (0..meta.n)
        .map(|i| {
            let (reason, tokens) = finish[i].expect("all finished");
            completion += tokens;
            let logprobs = meta.logprobs(&lps[i], 0);
            match meta.kind {
                Kind::Completion => {
                    json!({"text": texts[i], "index": i, "logprobs": logprobs, "finish_reason": reason})
                }
                Kind::Chat => json!({
                    "index": i,
                    "message": {"role": "assistant", "content": texts[i]},
                    "logprobs": logprobs,
                    "finish_reason": reason,
                }),
            }
        })
        .collect();
    let mut body = meta.envelope(false, choices);
    body["usage"] = meta.usage(completion);
    Ok(Json(body).into_response())
}

/// Streams chunks as Server-Sent Events: `data: {chunk}` per piece of text, a chunk
/// with each choice's finish reason, the usage chunk when asked for, `data: [DONE]`.
/// When the client goes away the stream is dropped, then the task below, then the
/// engine's channel, which cancels the sequences.
fn stream(meta: Meta, mut rx: mpsc::UnboundedReceiver<Event>, include_usage: bool) -> Response {
    let (out, out_rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let data = |v: Value| Ok(SseEvent::default().data(v.to_string()));
        if meta.kind == Kind::Chat {
            for i in 0..meta.n {
                let choice = json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
                if out.send(data(meta.envelope(true, vec![choice]))).await.is_err() {
                    return;
                }
            }
        }
        let mut offsets = vec![0usize; meta.n];
        let (mut left, mut completion) = (meta.n, 0);
        while left > 0 {
            let event = tokio::select! {
                e = rx.recv() => e,
                _ = out.closed() => return,
            };
            let choice = match event {
                Some(Event::Text { index, text, logprobs }) => {
                    let lp = meta.logprobs(&logprobs, offsets[index]);
                    offsets[index] += text.len();
                    match meta.kind {
                        Kind::Completion => {
                            json!({"text": text, "index": index, "logprobs": lp, "finish_reason": null})
                        }
                        Kind::Chat => {
                            json!({"index": index, "delta": {"content": text}, "logprobs": lp, "finish_reason": null})
                        }
                    }
                }
                Some(Event::Done { index, finish_reason, completion_tokens }) => {
                    left -= 1;
                    completion += completion_tokens;
                    match meta.kind {
                        Kind::Completion => {
                            json!({"text": "", "index": index, "logprobs": null, "finish_reason": finish_reason})
                        }
                        Kind::Chat => {
                            json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": finish_reason})
                        }
                    }
                }
                None => return,
            };
            if out.send(data(meta.envelope(true, vec![choice]))).await.is_err() {
                return;
            }
        }
        if include_usage {
            let mut chunk = meta.envelope(true, Vec::new());
            chunk["usage"] = meta.usage(completion);
            if out.send(data(chunk)).await.is_err() {
                return;
            }
        }
        let _ = out.send(Ok(SseEvent::default().data("[DONE]"))).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(out_rx)).keep_alive(KeepAlive::default()).into_response()
}

fn next_id(kind: Kind) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    match kind {
        Kind::Completion => format!("cmpl-{n:08x}"),
        Kind::Chat => format!("chatcmpl-{n:08x}"),
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
