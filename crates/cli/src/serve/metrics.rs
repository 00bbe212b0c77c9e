//! Counters and histograms of `anetrain serve`, written in Prometheus' text format
//! (version 0.0.4) for `GET /metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A latency histogram with fixed buckets (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<(Vec<u64>, f64, u64)>,
}

/// Bucket bounds from 1 ms to 30 s.
const LATENCY_BOUNDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

impl Histogram {
    fn new() -> Histogram {
        Histogram { bounds: LATENCY_BOUNDS, inner: Mutex::new((vec![0; LATENCY_BOUNDS.len()], 0.0, 0)) }
    }

    pub fn observe(&self, seconds: f64) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for (b, count) in self.bounds.iter().zip(g.0.iter_mut()) {
            if seconds <= *b {
                *count += 1;
            }
        }
        g.1 += seconds;
        g.2 += 1;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, count) in self.bounds.iter().zip(&g.0) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}", g.2, g.1, g.2);
    }
}

pub struct Metrics {
    pub requests: Mutex<std::collections::BTreeMap<(String, u16), u64>>,
    pub prompt_tokens: AtomicUsize,
    pub completion_tokens: AtomicUsize,
    /// Requests waiting for a place in the batch (shared with the engine's handle).
    pub queue_depth: Arc<AtomicUsize>,
    pub active: AtomicUsize,
    pub finished: AtomicUsize,
    pub cancelled: AtomicUsize,
    pub steps: AtomicUsize,
    pub rows: AtomicUsize,
    pub prefix_hits: AtomicUsize,
    pub prefix_tokens: AtomicUsize,
    pub ttft: Histogram,
    pub itl: Histogram,
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            requests: Mutex::new(Default::default()),
            prompt_tokens: AtomicUsize::new(0),
            completion_tokens: AtomicUsize::new(0),
            queue_depth: Arc::new(AtomicUsize::new(0)),
            active: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            cancelled: AtomicUsize::new(0),
            steps: AtomicUsize::new(0),
            rows: AtomicUsize::new(0),
            prefix_hits: AtomicUsize::new(0),
            prefix_tokens: AtomicUsize::new(0),
            ttft: Histogram::new(),
            itl: Histogram::new(),
        }
    }

    /// Counts a request answered on `endpoint` with `status`.
    pub fn request(&self, endpoint: &str, status: u16) {
        let mut g = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *g.entry((endpoint.to_string(), status)).or_default() += 1;
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP anetrain_requests_total HTTP requests answered, by endpoint and status.\n");
        out.push_str("# TYPE anetrain_requests_total counter\n");
        for ((endpoint, status), n) in self.requests.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "anetrain_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}");
        }
        let counters: [(&str, &str, &AtomicUsize); 8] = [
            ("anetrain_prompt_tokens_total", "Prompt tokens of accepted requests.", &self.prompt_tokens),
            ("anetrain_completion_tokens_total", "Tokens generated.", &self.completion_tokens),
            ("anetrain_sequences_finished_total", "Sequences that finished (stop or length).", &self.finished),
            ("anetrain_sequences_cancelled_total", "Sequences cancelled by a client that went away.", &self.cancelled),
            ("anetrain_batch_steps_total", "Batched forward passes.", &self.steps),
            ("anetrain_batch_rows_total", "Token rows over all batched forward passes.", &self.rows),
            ("anetrain_prefix_cache_hits_total", "Prompts that started from a cached prefix.", &self.prefix_hits),
            (
                "anetrain_prefix_cache_tokens_total",
                "Prompt tokens whose keys and values came from the prefix cache.",
                &self.prefix_tokens,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Ordering::Relaxed));
        }
        let gauges: [(&str, &str, &AtomicUsize); 2] = [
            ("anetrain_queue_depth", "Requests waiting for a place in the batch.", &self.queue_depth),
            ("anetrain_active_sequences", "Sequences in the batch.", &self.active),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}", v.load(Ordering::Relaxed));
        }
        self.ttft.write(
            &mut out,
            "anetrain_time_to_first_token_seconds",
            "From a request's arrival to its first token.",
        );
        self.itl.write(&mut out, "anetrain_inter_token_latency_seconds", "Between consecutive tokens of a sequence.");
        out
    }
}
