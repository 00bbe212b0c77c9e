//! The engine of `anetrain serve`: one thread owns the model and runs continuous
//! batching.
//!
//! Requests wait in a bounded queue; at every step the engine admits waiting requests
//! while there is room for more sequences (`max_batch`), builds one batch of rows — one
//! decode row for each sequence that is generating, then chunks of prompts still to
//! prefill, at most `prefill_chunk` prompt tokens per step in all, so a long prompt
//! never stalls the others for its whole length — and runs one batched forward pass
//! ([`BatchModel::step`]). Finished and cancelled sequences leave at once; new ones
//! join at the next step. A client that goes away (its event channel closed) cancels
//! its sequences.
//!
//! A prompt-prefix cache keeps the keys and values of recent prompts; a new prompt
//! starts from the longest cached prefix it shares (a system prompt, the earlier turns
//! of a chat), which is exact because a position's keys and values depend only on the
//! tokens up to it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use llama::tokenizers::{AnyTokenizer, StreamDecoder};
use llama::Sampler;
use tokio::sync::mpsc::UnboundedSender;

use super::batch::{BatchModel, Row, SeqKv};
use super::metrics::Metrics;

/// Sampling and stopping for one request.
#[derive(Clone, Debug)]
pub struct GenParams {
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub n: usize,
    pub stop: Vec<String>,
    /// Top alternatives to report per token; `None`: no log-probabilities.
    pub logprobs: Option<usize>,
    /// Generate past end-of-text (vLLM's extension, for benchmarks).
    pub ignore_eos: bool,
}

/// A token's log-probability and the most likely alternatives.
#[derive(Clone, Debug)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// What the engine tells a request, per choice `index`.
#[derive(Debug)]
pub enum Event {
    /// New text (possibly empty while a character or a possible stop string is held
    /// back) and, when asked for, the log-probabilities of the tokens it came from.
    Text {
        index: usize,
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    Done {
        index: usize,
        finish_reason: &'static str,
        completion_tokens: usize,
    },
}

/// A request for the engine.
pub struct Job {
    pub prompt: Vec<u32>,
    pub params: GenParams,
    pub events: UnboundedSender<Event>,
    pub received: Instant,
}

/// Limits and sizes of the engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub max_batch: usize,
    pub queue: usize,
    pub prefill_chunk: usize,
    /// Bytes of keys and values the prefix cache may keep.
    pub prefix_cache_bytes: usize,
    /// Sleep after every step (tests only; zero otherwise).
    pub step_delay: std::time::Duration,
}

/// The HTTP side's handle: submits jobs, refuses them when the queue is full.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Job>,
    waiting: Arc<AtomicUsize>,
    queue: usize,
}

impl EngineHandle {
    /// Queues `job`; `Err(job)` when the queue is full (or the engine has stopped).
    #[allow(clippy::result_large_err)]
    pub fn submit(&self, job: Job) -> Result<(), Job> {
        // Reserve a place first, so that concurrent submits cannot overfill the queue.
        let before = self.waiting.fetch_add(1, Ordering::SeqCst);
        if before >= self.queue {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(job);
        }
        self.tx.send(job).map_err(|e| {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            e.0
        })
    }
}

/// Starts the engine thread. It runs until every handle is dropped and the last
/// sequence has finished.
pub fn start(
    model: Arc<BatchModel>,
    tokenizer: Arc<AnyTokenizer>,
    stop_ids: Vec<u32>,
    config: EngineConfig,
    metrics: Arc<Metrics>,
) -> (EngineHandle, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let waiting = metrics.queue_depth.clone();
    let handle = EngineHandle { tx, waiting: waiting.clone(), queue: config.queue };
    let thread = std::thread::Builder::new()
        .name("serve-engine".into())
        .spawn(move || {
            let mut engine = Engine {
                model,
                tokenizer,
                stop_ids,
                config,
                metrics,
                waiting,
                rx,
                queue: VecDeque::new(),
                active: Vec::new(),
                prefix: Vec::new(),
                open: true,
            };
            engine.run();
        })
        .expect("the engine thread starts");
    (handle, thread)
}

/// One sequence (one choice of one request).
struct Seq {
    index: usize,
    events: UnboundedSender<Event>,
    /// Prompt, then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    kv: SeqKv,
    sampler: Sampler,
    decoder: StreamDecoder,
    params: GenParams,
    /// Decoded text not sent yet (it may be the start of a stop string).
    pending: String,
    logprobs: Vec<TokenLogprob>,
    generated: usize,
    received: Instant,
    last_token: Option<Instant>,
    done: bool,
}

impl Seq {
    /// Positions whose keys and values are in the cache.
    fn cached(&self, kv_dim: usize) -> usize {
        self.kv.len(kv_dim)
    }
}

struct PrefixEntry {
    tokens: Vec<u32>,
    kv: SeqKv,
    used: Instant,
}

struct Engine {
    model: Arc<BatchModel>,
    tokenizer: Arc<AnyTokenizer>,
    stop_ids: Vec<u32>,
    config: EngineConfig,
    metrics: Arc<Metrics>,
    waiting: Arc<AtomicUsize>,
    rx: mpsc::Receiver<Job>,
    /// Jobs received, not yet admitted.
    queue: VecDeque<Job>,
    active: Vec<Seq>,
    prefix: Vec<PrefixEntry>,
    open: bool,
}

impl Engine {
    fn run(&mut self) {
        loop {
            // Take what has arrived; block only when there is nothing to do.
            if self.active.is_empty() && self.queue.is_empty() {
                if !self.open {
                    return;
                }
                match self.rx.recv() {
                    Ok(job) => self.queue.push_back(job),
                    Err(_) => return,
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(job) => self.queue.push_back(job),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        self.open = false;
                        break;
                    }
                }
            }
            self.admit();
            self.step();
        }
    }

    /// Moves queued jobs into the batch while there is room (a job with `n` choices
    /// takes `n` sequences).
    fn admit(&mut self) {
        let kv_dim = self.model.config().kv_dim();
        while let Some(job) = self.queue.front() {
            if self.active.len() + job.params.n > self.config.max_batch && !self.active.is_empty() {
                break;
            }
            let job = self.queue.pop_front().expect("a job is at the front");
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            if job.events.is_closed() {
                continue;
            }
            // The longest cached prefix, leaving at least the last prompt token to run
            // (its logits choose the first new token).
            let (mut best, mut best_len) = (None, 0);
            for (i, e) in self.prefix.iter().enumerate() {
                let common = e.tokens.iter().zip(&job.prompt).take_while(|(a, b)| a == b).count();
                let usable = common.min(job.prompt.len() - 1);
                if usable > best_len {
                    (best, best_len) = (Some(i), usable);
                }
            }
            let kv = match best {
                Some(i) => {
                    self.prefix[i].used = Instant::now();
                    self.metrics.prefix_hits.fetch_add(1, Ordering::Relaxed);
                    self.metrics.prefix_tokens.fetch_add(best_len, Ordering::Relaxed);
                    self.prefix[i].kv.prefix(best_len, kv_dim)
                }
                None => SeqKv::new(self.model.config().n_layers),
            };
            for index in 0..job.params.n {
                let seed = job.params.seed.wrapping_add(index as u64);
                let sampler = Sampler::new(job.params.temperature, job.params.top_p, seed.max(1))
                    .expect("parameters checked by the HTTP layer");
                let decoder = match StreamDecoder::new(&self.tokenizer, &job.prompt) {
                    Ok(d) => d,
                    Err(_) => continue,
                };
                self.active.push(Seq {
                    index,
                    events: job.events.clone(),
                    tokens: job.prompt.clone(),
                    prompt_len: job.prompt.len(),
                    kv: kv.clone(),
                    sampler,
                    decoder,
                    params: job.params.clone(),
                    pending: String::new(),
                    logprobs: Vec::new(),
                    generated: 0,
                    received: job.received,
                    last_token: None,
                    done: false,
                });
            }
        }
        self.metrics.active.store(self.active.len(), Ordering::Relaxed);
    }

    /// One batched forward pass over every active sequence, then sampling.
    fn step(&mut self) {
        let kv_dim = self.model.config().kv_dim();
        // Sequences whose client went away leave before they cost anything.
        for s in &mut self.active {
            if s.events.is_closed() {
                s.done = true;
                self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.active.retain(|s| !s.done);
        if self.active.is_empty() {
            self.metrics.active.store(0, Ordering::Relaxed);
            return;
        }
        // Decode rows first, then prompt chunks within the prefill budget.
        let mut rows = Vec::new();
        for (i, s) in self.active.iter().enumerate() {
            let cached = s.cached(kv_dim);
            if s.tokens.len() - cached == 1 {
                rows.push(Row { seq: i, token: s.tokens[cached], pos: cached, logits: true });
            }
        }
        let mut budget = self.config.prefill_chunk.max(1);
        for (i, s) in self.active.iter().enumerate() {
            let cached = s.cached(kv_dim);
            let todo = s.tokens.len() - cached;
            if todo <= 1 || budget == 0 {
                continue;
            }
            let take = todo.min(budget);
            budget -= take;
            for pos in cached..cached + take {
                rows.push(Row { seq: i, token: s.tokens[pos], pos, logits: pos + 1 == s.tokens.len() });
            }
        }
        // Rows of one sequence must be consecutive (prefill chunks are; decode rows are
        // one per sequence and a sequence is never both).
        let mut caches: Vec<&mut SeqKv> = self.active.iter_mut().map(|s| &mut s.kv).collect();
        let logits = self.model.step(&rows, &mut caches);
        self.metrics.steps.fetch_add(1, Ordering::Relaxed);
        if !self.config.step_delay.is_zero() {
            std::thread::sleep(self.config.step_delay);
        }
        self.metrics.rows.fetch_add(rows.len(), Ordering::Relaxed);
        let with_logits: Vec<usize> = rows.iter().filter(|r| r.logits).map(|r| r.seq).collect();
        for (seq, mut logits) in with_logits.into_iter().zip(logits) {
            self.sample(seq, &mut logits);
        }
        let finished: Vec<Seq> = {
            let (done, keep): (Vec<Seq>, Vec<Seq>) = std::mem::take(&mut self.active).into_iter().partition(|s| s.done);
            self.active = keep;
            done
        };
        for s in finished {
            self.remember_prefix(s);
        }
        self.metrics.active.store(self.active.len(), Ordering::Relaxed);
    }

    /// Chooses sequence `i`'s next token from `logits` and tells its client.
    fn sample(&mut self, i: usize, logits: &mut [f32]) {
        let usable = self.tokenizer.vocab_size().min(logits.len());
        // Embedding rows past the tokenizer's ids are padding (Qwen2.5): never sample them.
        logits[usable..].fill(f32::NEG_INFINITY);
        let context = self.model.config().seq_len;
        let s = &mut self.active[i];
        let next = s.sampler.sample(logits);
        let now = Instant::now();
        if !s.params.ignore_eos && self.stop_ids.contains(&next) {
            finish(s, &self.tokenizer, "stop", true, &self.metrics);
            return;
        }
        match s.last_token {
            None => self.metrics.ttft.observe(now.duration_since(s.received).as_secs_f64()),
            Some(t) => self.metrics.itl.observe(now.duration_since(t).as_secs_f64()),
        }
        s.last_token = Some(now);
        s.tokens.push(next);
        s.generated += 1;
        self.metrics.completion_tokens.fetch_add(1, Ordering::Relaxed);
        if let Some(k) = s.params.logprobs {
            s.logprobs.push(token_logprob(&self.tokenizer, logits, next, k));
        }
        let piece = s.decoder.push(&self.tokenizer, next).unwrap_or_default();
        s.pending.push_str(&piece);
        if emit(s, false) {
            finish(s, &self.tokenizer, "stop", false, &self.metrics);
        } else if s.generated >= s.params.max_tokens || s.tokens.len() >= context {
            finish(s, &self.tokenizer, "length", true, &self.metrics);
        }
    }

    /// Keeps the prompt's keys and values of a finished sequence for later prompts
    /// that share a prefix with it, within the cache's byte budget (least recently
    /// used entries go first).
    fn remember_prefix(&mut self, s: Seq) {
        let kv_dim = self.model.config().kv_dim();
        let n = s.prompt_len.min(s.cached(kv_dim));
        if n < 2 || self.config.prefix_cache_bytes == 0 {
            return;
        }
        let prompt = &s.tokens[..n];
        if self.prefix.iter().any(|e| e.tokens.len() >= n && &e.tokens[..n] == prompt) {
            return;
        }
        // An entry this prompt extends is superseded by it.
        self.prefix.retain(|e| !(e.tokens.len() < n && e.tokens[..] == prompt[..e.tokens.len()]));
        let entry = PrefixEntry { tokens: prompt.to_vec(), kv: s.kv.prefix(n, kv_dim), used: Instant::now() };
        let mut total: usize = self.prefix.iter().map(|e| e.kv.bytes()).sum::<usize>() + entry.kv.bytes();
        if entry.kv.bytes() > self.config.prefix_cache_bytes {
            return;
        }
        while total > self.config.prefix_cache_bytes {
            let oldest = (0..self.prefix.len()).min_by_key(|&i| self.prefix[i].used).expect("entries left");
            total -= self.prefix[oldest].kv.bytes();
            self.prefix.swap_remove(oldest);
        }
        self.prefix.push(entry);
    }
}

/// Sends what of `s.pending` can be sent: everything when `all`, else all but a tail
/// that may begin a stop string. Returns true when a stop string was found (the text
/// before it is sent, the rest dropped).
fn emit(s: &mut Seq, all: bool) -> bool {
    let mut stopped = false;
    let mut send = s.pending.len();
    if let Some(at) = s.params.stop.iter().filter_map(|stop| s.pending.find(stop.as_str())).min() {
        send = at;
        stopped = true;
    } else if !all {
        // The longest tail of pending that is a proper prefix of a stop string.
        let hold = s
            .params
            .stop
            .iter()
            .flat_map(|stop| (1..stop.len()).filter(|&l| stop.is_char_boundary(l)).map(move |l| &stop[..l]))
            .filter(|p| s.pending.ends_with(p))
            .map(str::len)
            .max()
            .unwrap_or(0);
        send = s.pending.len() - hold;
    }
    let text: String = s.pending[..send].to_string();
    s.pending.drain(..send);
    if stopped {
        s.pending.clear();
    }
    let logprobs = std::mem::take(&mut s.logprobs);
    if !text.is_empty() || !logprobs.is_empty() {
        let _ = s.events.send(Event::Text { index: s.index, text, logprobs });
    }
    stopped
}

/// Ends a sequence: with `flush`, sends the text still held back (an incomplete
/// character, a possible start of a stop string) — not after a stop string, whose
/// text and what follows are dropped — then the finish reason.
fn finish(s: &mut Seq, tokenizer: &AnyTokenizer, reason: &'static str, flush: bool, metrics: &Metrics) {
    if !s.done {
        let mut reason = reason;
        if flush {
            let rest = s.decoder.finish(tokenizer).unwrap_or_default();
            s.pending.push_str(&rest);
            if emit(s, true) {
                reason = "stop";
            }
        }
        let _ = s.events.send(Event::Done { index: s.index, finish_reason: reason, completion_tokens: s.generated });
        metrics.finished.fetch_add(1, Ordering::Relaxed);
        s.done = true;
    }
}

/// The chosen token's log-probability under the model (log-softmax of the raw
/// logits) and the `k` most likely tokens.
fn token_logprob(tokenizer: &AnyTokenizer, logits: &[f32], token: u32, k: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    let lp = |id: usize| (logits[id] as f64 - lse) as f32;
    let text = |id: u32| tokenizer.decode(&[id]).unwrap_or_default();
    let mut top: Vec<(String, f32)> = Vec::new();
    if k > 0 {
        let mut ids: Vec<usize> = (0..logits.len()).collect();
        let k = k.min(ids.len());
        ids.select_nth_unstable_by(k - 1, |&a, &b| logits[b].total_cmp(&logits[a]));
        ids.truncate(k);
        ids.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        top = ids.into_iter().map(|id| (text(id as u32), lp(id))).collect();
    }
    TokenLogprob { token: text(token), logprob: lp(token as usize), top }
}
