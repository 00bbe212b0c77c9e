//! Drawing one frame of the dashboard from a [`Dashboard`] snapshot. Drawing is a pure
//! function of the snapshot, so tests render it to ratatui's `TestBackend` and read the
//! cells back.
//!
//! ```text
//!  anetrain · step 40/60 (67 %) · loss 4.74 · val 4.77 @40 · ETA 0:01 · running
//! ┌ loss ─────────────────────────────────────┐┌ run ──────────────────────┐
//! │ train ⣀⡠⠤⠒ val • restart │                 ││ model, params, settings  │
//! └───────────────────────────────────────────┘└──────────────────────────┘
//! ┌ ms/step ──────────┐┌ phases ─────────────┐┌ throughput ┐┌ system ────┐
//! └───────────────────┘└─────────────────────┘└────────────┘└────────────┘
//! ┌ sample · step 40 ───────────────────────────────────────────────────────┐
//!  q quit · following t.jsonl · 68 lines · 0 malformed
//! ```

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Style, Stylize};
use ratatui::symbols::Marker;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Axis, Block, Chart, Dataset, GraphType, LegendPosition, Paragraph, Wrap};
use ratatui::Frame;

use crate::run::{MarkerKind, Run, RunLog};
use crate::sampler::SampleText;
use crate::system::{Power, ProcStats};

/// Steps averaged for the figures that would flicker step by step (ms, tokens/s, phases).
pub const RECENT_STEPS: usize = 20;
/// From this width on the run's settings get their own panel beside the loss chart.
pub const WIDE: u16 = 110;
/// Below this the layout cannot show the panels; the frame says so instead.
pub const MIN_SIZE: (u16, u16) = (60, 20);

const TRAIN_COLOR: Color = Color::Cyan;
const VAL_COLOR: Color = Color::Yellow;
const MS_COLOR: Color = Color::Green;
const RESTART_COLOR: Color = Color::Red;
const RESUME_COLOR: Color = Color::Magenta;
const LABEL: Style = Style::new().fg(Color::DarkGray);

/// Everything one frame shows.
pub struct Dashboard {
    /// What is being watched: "following runs/t.jsonl", "anetrain train --steps 60".
    pub source: String,
    pub log: RunLog,
    /// Bytes of an incomplete last line, held back until its newline arrives.
    pub pending_bytes: usize,
    /// Whether more telemetry may come.
    pub status: SourceStatus,
    /// The measured process: its label ("training, pid 42") and numbers or why not.
    pub process: Option<(String, Result<ProcStats, String>)>,
    pub cores: usize,
    pub power: (String, Power),
    pub sample: SampleState,
    /// Where the training's stdout and stderr go, when the dashboard started it.
    pub child_log: Option<String>,
    /// Why the telemetry file could not be read at the last attempt.
    pub read_error: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum SourceStatus {
    /// The file is followed; the writer may or may not be alive.
    Following,
    /// The training child runs.
    Running,
    /// The training child exited: its status line ("exit 0", "killed by signal 9").
    Exited { success: bool, how: String },
}

#[derive(Clone, Debug, PartialEq)]
pub enum SampleState {
    /// Sampling is off (the reason: `--sample-every 0`, no checkpoint yet, …).
    Idle(String),
    /// Working on the checkpoint of this step; the previous text (if any) stays shown.
    Working {
        step: u64,
        previous: Option<SampleText>,
    },
    Done(SampleText),
}

impl Dashboard {
    /// An empty dashboard for `source`: no telemetry yet, nothing measured.
    pub fn new(source: impl Into<String>) -> Dashboard {
        Dashboard {
            source: source.into(),
            log: RunLog::default(),
            pending_bytes: 0,
            status: SourceStatus::Following,
            process: None,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            power: ("power".into(), Power::Unavailable("not measured".into())),
            sample: SampleState::Idle("no checkpoint yet".into()),
            child_log: None,
            read_error: None,
        }
    }
}

/// Draws the whole frame.
pub fn draw(frame: &mut Frame, d: &Dashboard) {
    let area = frame.area();
    let [header, body, footer] =
        Layout::vertical([Constraint::Length(1), Constraint::Min(0), Constraint::Length(1)]).areas(area);
    let empty = Run::default();
    let run = d.log.current().unwrap_or(&empty);
    frame.render_widget(Paragraph::new(header_line(d, run)), header);
    frame.render_widget(Paragraph::new(footer_line(d)), footer);
    if area.width < MIN_SIZE.0 || area.height < MIN_SIZE.1 {
        let msg = format!("terminal too small: {}×{}, need {}×{}", area.width, area.height, MIN_SIZE.0, MIN_SIZE.1);
        frame.render_widget(Paragraph::new(msg).wrap(Wrap { trim: true }), body);
        return;
    }
    if area.width >= WIDE {
        draw_wide(frame, body, d, run);
    } else {
        draw_narrow(frame, body, d, run);
    }
}

/// Side by side: charts beside the run's settings, then ms/step, phases and numbers.
fn draw_wide(frame: &mut Frame, body: Rect, d: &Dashboard, run: &Run) {
    let sample_rows = if body.height >= 30 { 6 } else { 4 };
    let [top, middle, bottom] =
        Layout::vertical([Constraint::Percentage(55), Constraint::Percentage(45), Constraint::Length(sample_rows)])
            .areas(body);
    let [loss, info] = Layout::horizontal([Constraint::Min(30), Constraint::Length(42)]).areas(top);
    draw_loss(frame, loss, run);
    draw_info(frame, info, run);
    let [ms, phases, numbers] =
        Layout::horizontal([Constraint::Percentage(36), Constraint::Percentage(30), Constraint::Percentage(34)])
            .areas(middle);
    draw_ms(frame, ms, run);
    draw_phases(frame, phases, run);
    let [throughput, system] = Layout::vertical([Constraint::Min(5), Constraint::Length(6)]).areas(numbers);
    frame.render_widget(Paragraph::new(throughput_lines(run, false)).block(panel("throughput")), throughput);
    frame
        .render_widget(Paragraph::new(system_lines(d, false)).wrap(Wrap { trim: true }).block(panel("system")), system);
    draw_sample(frame, bottom, d);
}

/// An 80-column terminal (an SSH session's default): the settings shrink to two lines
/// of summary, the charts share a row, and the numbers share one panel.
fn draw_narrow(frame: &mut Frame, body: Rect, d: &Dashboard, run: &Run) {
    // The panels' rows: 8 phases (or 6 numbers) and the borders.
    const PANEL_ROWS: u16 = 10;
    let sample_rows = if body.height >= 30 { 5 } else { 3 };
    let summary_rows = if body.height >= 26 { 2 } else { 0 };
    let [summary, charts, panels, bottom] = Layout::vertical([
        Constraint::Length(summary_rows),
        Constraint::Min(6),
        Constraint::Length(PANEL_ROWS),
        Constraint::Length(sample_rows),
    ])
    .areas(body);
    frame.render_widget(Paragraph::new(summary_lines(run)).wrap(Wrap { trim: true }), summary);
    let [loss, ms] = Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(charts);
    draw_loss(frame, loss, run);
    draw_ms(frame, ms, run);
    let [phases, numbers] = Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(panels);
    draw_phases(frame, phases, run);
    let mut lines = throughput_lines(run, true);
    lines.extend(system_lines(d, true));
    frame.render_widget(Paragraph::new(lines).wrap(Wrap { trim: true }).block(panel("throughput · system")), numbers);
    draw_sample(frame, bottom, d);
}

/// The run's settings in two lines, for the narrow layout.
fn summary_lines(run: &Run) -> Vec<Line<'static>> {
    let Some(info) = &run.info else { return vec![Line::styled(" no start event yet", LABEL)] };
    let c = &info.config;
    vec![
        Line::styled(
            format!(
                " dim {} · hidden {} · {} layers · {} heads ({} kv) · vocab {} · context {}",
                c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len
            ),
            LABEL,
        ),
        Line::styled(
            format!(
                " {} params · {} {} {} · {} tokens/step · {}/step",
                fmt_si(info.n_params as f64, ""),
                info.device,
                info.precision,
                info.pipeline,
                info.tokens_per_step,
                fmt_si(info.flops_per_step, "FLOP")
            ),
            LABEL,
        ),
    ]
}

fn header_line(d: &Dashboard, run: &Run) -> Line<'static> {
    let mut spans = vec![Span::styled(" anetrain ", Style::new().bold().reversed())];
    let sep = || Span::styled(" · ", LABEL);
    match run.last_step() {
        Some(last) => {
            spans.push(sep());
            let of_total = match run.total_steps() {
                Some(total) if total > 0 => {
                    format!("step {}/{total} ({:.0} %)", last.step, 100.0 * last.step as f64 / total as f64)
                }
                _ => format!("step {}", last.step),
            };
            spans.push(Span::raw(of_total).bold());
            spans.push(sep());
            spans.push(Span::styled(format!("loss {:.4}", last.loss), Style::new().fg(TRAIN_COLOR)));
            if let Some((step, val)) = run.latest_eval() {
                spans.push(sep());
                spans.push(Span::styled(format!("val {val:.4} @{step}"), Style::new().fg(VAL_COLOR)));
            }
            let live = run.report.is_none() && !matches!(d.status, SourceStatus::Exited { .. });
            if let Some(eta) = run.eta_seconds(RECENT_STEPS).filter(|_| live) {
                spans.push(sep());
                spans.push(Span::raw(format!("ETA {}", fmt_duration(eta))));
            }
        }
        None => {
            spans.push(sep());
            spans.push(Span::raw("waiting for telemetry…"));
        }
    }
    spans.push(sep());
    let (text, style) = match (&d.status, run.report.is_some()) {
        (SourceStatus::Exited { success: false, how }, _) => {
            (format!("training failed ({how})"), Style::new().red().bold())
        }
        (SourceStatus::Exited { how, .. }, true) => (format!("finished ({how})"), Style::new().green()),
        (_, true) => ("finished".to_string(), Style::new().green()),
        (SourceStatus::Exited { how, .. }, false) => (format!("training exited ({how})"), Style::new().yellow()),
        (SourceStatus::Running, false) => ("running".to_string(), Style::new().green()),
        (SourceStatus::Following, false) => ("following".to_string(), Style::new()),
    };
    spans.push(Span::styled(text, style));
    Line::from(spans)
}

/// The bottom line, most important first (a narrow terminal cuts the end): keys, line
/// counts, the training log, then the source.
fn footer_line(d: &Dashboard) -> Line<'static> {
    /// Characters of a malformed line's reason shown; the rest is cut with "…".
    const REASON_CHARS: usize = 60;
    let stats = &d.log.stats;
    let sep = || Span::styled(" · ", LABEL);
    let mut spans = vec![
        Span::styled(" q", Style::new().bold()),
        Span::styled(" quit", LABEL),
        sep(),
        Span::styled(format!("{} lines", stats.lines), LABEL),
        sep(),
    ];
    let malformed = format!("{} malformed", stats.malformed);
    if stats.malformed > 0 {
        spans.push(Span::styled(malformed, Style::new().red().bold()));
        if let Some((line, reason)) = &stats.last_malformed {
            let mut shown: String = reason.chars().take(REASON_CHARS).collect();
            if reason.chars().count() > REASON_CHARS {
                shown.push('…');
            }
            spans.push(Span::styled(format!(" (last: line {line}: {shown})"), Style::new().red()));
        }
    } else {
        spans.push(Span::styled(malformed, LABEL));
    }
    if let Some(e) = &d.read_error {
        spans.push(sep());
        spans.push(Span::styled(e.clone(), Style::new().red().bold()));
    }
    if stats.unknown > 0 {
        spans.push(Span::styled(format!(" · {} unknown events", stats.unknown), LABEL));
    }
    if d.pending_bytes > 0 {
        spans.push(Span::styled(format!(" · {} bytes of an unfinished line", d.pending_bytes), LABEL));
    }
    if let Some(log) = &d.child_log {
        spans.push(Span::styled(" · training log: ", LABEL));
        spans.push(Span::raw(log.clone()));
    }
    spans.push(sep());
    spans.push(Span::raw(d.source.clone()));
    Line::from(spans)
}

/// At most `max_points` points of `points` (sorted by x) for a chart: each of
/// `max_points / 2` buckets keeps its lowest and highest point, so spikes survive.
pub fn downsample(points: &[(f64, f64)], max_points: usize) -> Vec<(f64, f64)> {
    if points.len() <= max_points.max(2) {
        return points.to_vec();
    }
    let buckets = (max_points / 2).max(1);
    let mut out = Vec::with_capacity(2 * buckets);
    for b in 0..buckets {
        let chunk = &points[b * points.len() / buckets..(b + 1) * points.len() / buckets];
        let lo = chunk.iter().enumerate().min_by(|a, b| a.1 .1.total_cmp(&b.1 .1));
        let hi = chunk.iter().enumerate().max_by(|a, b| a.1 .1.total_cmp(&b.1 .1));
        if let (Some((i_lo, lo)), Some((i_hi, hi))) = (lo, hi) {
            // Keep the two in x order so the line between them goes forward.
            match i_lo.cmp(&i_hi) {
                std::cmp::Ordering::Less => out.extend([*lo, *hi]),
                std::cmp::Ordering::Greater => out.extend([*hi, *lo]),
                std::cmp::Ordering::Equal => out.push(*lo),
            }
        }
    }
    out
}

/// `[lo, hi]` of the values with a margin, never empty.
fn padded_bounds(values: impl Iterator<Item = f64>, from_zero: bool) -> [f64; 2] {
    let (mut lo, mut hi) =
        values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        return [0.0, 1.0];
    }
    if from_zero {
        lo = lo.min(0.0);
    }
    let margin = ((hi - lo) * 0.05).max(hi.abs() * 1e-3).max(1e-6);
    if !from_zero {
        lo -= margin;
    }
    hi += margin;
    [lo, hi]
}

/// The step range the charts span: from 0 to the configured total (or the last step).
fn step_bounds(run: &Run) -> [f64; 2] {
    let last = run.last_step().map_or(1, |s| s.step);
    let first = run.steps.first().map_or(0, |s| s.step.saturating_sub(1));
    [first as f64, run.total_steps().unwrap_or(last).max(last).max(first + 1) as f64]
}

fn axis_labels(bounds: [f64; 2], decimals: usize) -> Vec<Span<'static>> {
    let mid = (bounds[0] + bounds[1]) / 2.0;
    [bounds[0], mid, bounds[1]].iter().map(|v| Span::styled(format!("{v:.decimals$}"), LABEL)).collect()
}

/// Vertical lines at the restarts and resumes, as chart datasets (each a two-point line).
fn marker_lines(run: &Run, y: [f64; 2]) -> Vec<(Vec<(f64, f64)>, MarkerKind)> {
    run.markers.iter().map(|m| (vec![(m.step as f64, y[0]), (m.step as f64, y[1])], m.kind)).collect()
}

fn marker_datasets<'a>(lines: &'a [(Vec<(f64, f64)>, MarkerKind)]) -> Vec<Dataset<'a>> {
    let mut named = [false, false];
    lines
        .iter()
        .map(|(points, kind)| {
            let (name, color, i) = match kind {
                MarkerKind::Restart => ("restart", RESTART_COLOR, 0),
                MarkerKind::Resume => ("resume", RESUME_COLOR, 1),
            };
            let dataset = Dataset::default().marker(Marker::Braille).graph_type(GraphType::Line).fg(color).data(points);
            // One legend entry per kind.
            if std::mem::replace(&mut named[i], true) {
                dataset
            } else {
                dataset.name(name)
            }
        })
        .collect()
}

fn panel(title: &str) -> Block<'static> {
    Block::bordered().title(Span::styled(format!(" {title} "), Style::new().bold())).border_style(LABEL)
}

fn draw_loss(frame: &mut Frame, area: Rect, run: &Run) {
    let width = area.width.saturating_sub(10) as usize;
    let train: Vec<(f64, f64)> = run.steps.iter().map(|s| (s.step as f64, s.loss as f64)).collect();
    let train = downsample(&train, 4 * width);
    let val: Vec<(f64, f64)> = run.evals.iter().map(|&(s, v)| (s as f64, v as f64)).collect();
    let y = padded_bounds(train.iter().chain(&val).map(|p| p.1), false);
    let x = step_bounds(run);
    let markers = marker_lines(run, y);
    let mut datasets = marker_datasets(&markers);
    datasets.push(
        Dataset::default()
            .name("train")
            .marker(Marker::Braille)
            .graph_type(GraphType::Line)
            .fg(TRAIN_COLOR)
            .data(&train),
    );
    if !val.is_empty() {
        // Evaluations are sparse points; a line joining them would paint over the train
        // curve (a braille cell takes the colour of the last dataset drawn in it).
        datasets.push(
            Dataset::default().name("val").marker(Marker::Dot).graph_type(GraphType::Scatter).fg(VAL_COLOR).data(&val),
        );
    }
    let chart = Chart::new(datasets)
        .block(panel("loss"))
        .x_axis(Axis::default().bounds(x).labels(axis_labels(x, 0)).style(LABEL))
        .y_axis(Axis::default().bounds(y).labels(axis_labels(y, 2)).style(LABEL))
        .legend_position(Some(LegendPosition::TopRight))
        .hidden_legend_constraints((Constraint::Ratio(1, 2), Constraint::Ratio(1, 2)));
    frame.render_widget(chart, area);
}

fn draw_ms(frame: &mut Frame, area: Rect, run: &Run) {
    let width = area.width.saturating_sub(8) as usize;
    let ms: Vec<(f64, f64)> = run.steps.iter().map(|s| (s.step as f64, s.ms)).collect();
    let ms = downsample(&ms, 4 * width);
    let y = padded_bounds(ms.iter().map(|p| p.1), true);
    let x = step_bounds(run);
    let markers = marker_lines(run, y);
    let mut datasets = marker_datasets(&markers);
    datasets.push(Dataset::default().marker(Marker::Braille).graph_type(GraphType::Line).fg(MS_COLOR).data(&ms));
    let title = match run.recent_mean(RECENT_STEPS, |s| s.ms) {
        Some(mean) => format!("ms/step · {mean:.1} mean of last {}", run.recent(RECENT_STEPS).len()),
        None => "ms/step".to_string(),
    };
    let chart = Chart::new(datasets)
        .block(panel(&title))
        .x_axis(Axis::default().bounds(x).labels(axis_labels(x, 0)).style(LABEL))
        .y_axis(Axis::default().bounds(y).labels(axis_labels(y, 0)).style(LABEL))
        .legend_position(None);
    frame.render_widget(chart, area);
}

/// A horizontal bar of `fraction` of `width` cells, in eighths of a cell.
fn bar(fraction: f64, width: usize) -> String {
    const EIGHTHS: [char; 8] = [' ', '▏', '▎', '▍', '▌', '▋', '▊', '▉'];
    let eighths = (fraction.clamp(0.0, 1.0) * width as f64 * 8.0).round() as usize;
    let mut s = "█".repeat(eighths / 8);
    if !eighths.is_multiple_of(8) {
        s.push(EIGHTHS[eighths % 8]);
    }
    s
}

fn draw_phases(frame: &mut Frame, area: Rect, run: &Run) {
    let Some(phases) = run.recent_phases(RECENT_STEPS) else {
        frame.render_widget(Paragraph::new("no steps yet").block(panel("phases")), area);
        return;
    };
    let list = phases.named();
    let total: f64 = list.iter().map(|p| p.1).sum();
    let max = list.iter().map(|p| p.1).fold(0.0, f64::max);
    // name (15) + space + bar + " 123.4 ms 45 %" (14)
    let bar_width = (area.width as usize).saturating_sub(2 + 16 + 14).max(1);
    let lines: Vec<Line> = list
        .iter()
        .map(|&(name, ms)| {
            let share = if total > 0.0 { ms / total } else { 0.0 };
            Line::from(vec![
                Span::styled(format!("{name:<15} "), LABEL),
                Span::styled(
                    format!("{:<bar_width$}", bar(if max > 0.0 { ms / max } else { 0.0 }, bar_width)),
                    Style::new().fg(MS_COLOR),
                ),
                Span::raw(format!("{ms:>7.1} ms {:>3.0} %", 100.0 * share)),
            ])
        })
        .collect();
    let title = format!("phases · mean of last {} steps", run.recent(RECENT_STEPS).len());
    frame.render_widget(Paragraph::new(lines).block(panel(&title)), area);
}

fn kv(key: &str, value: impl Into<String>) -> Line<'static> {
    Line::from(vec![Span::styled(format!("{key:<10}"), LABEL), Span::raw(value.into())])
}

fn draw_info(frame: &mut Frame, area: Rect, run: &Run) {
    let Some(info) = &run.info else {
        frame.render_widget(Paragraph::new("no start event yet").block(panel("run")), area);
        return;
    };
    let c = &info.config;
    let setting = |name: &str| info.setting(name);
    let fmt_setting = |name: &str| setting(name).map_or("?".to_string(), |v| format!("{v}"));
    let mut lines = vec![
        kv("model", format!("dim {} · hidden {}", c.dim, c.hidden_dim)),
        kv("", format!("{} layers · {} heads ({} kv)", c.n_layers, c.n_heads, c.n_kv_heads)),
        kv("", format!("vocab {} · context {}", c.vocab_size, c.seq_len)),
        kv("params", format!("{} ({})", group_thousands(info.n_params as u64), fmt_si(info.n_params as f64, ""))),
        kv("device", format!("{} · {} · {}", info.device, info.precision, info.pipeline)),
        kv(
            "tokens",
            format!(
                "{}/step ({}×{} ×{} accum)",
                info.tokens_per_step,
                fmt_setting("batch"),
                fmt_setting("seq"),
                fmt_setting("accum")
            ),
        ),
        kv("FLOPs", format!("{}/step", fmt_si(info.flops_per_step, "FLOP"))),
    ];
    if let (Some(lr), Some(min_lr)) = (setting("lr"), setting("min_lr")) {
        lines.push(kv("lr", format!("{lr:.1e} → {min_lr:.1e}, warmup {}", fmt_setting("warmup"))));
    }
    lines.push(kv(
        "every",
        format!(
            "eval {} · ckpt {} · seed {}",
            fmt_setting("eval_every"),
            fmt_setting("ckpt_every"),
            fmt_setting("seed")
        ),
    ));
    if let Some(last) = run.last_step() {
        lines.push(kv("now", format!("lr {:.2e} · grad norm {:.3}", last.lr, last.grad_norm)));
    }
    frame.render_widget(Paragraph::new(lines).block(panel("run")), area);
}

/// Throughput, compile and restarts; `compact` folds them into fewer lines.
fn throughput_lines(run: &Run, compact: bool) -> Vec<Line<'static>> {
    let n = run.recent(RECENT_STEPS).len();
    let mut lines = Vec::new();
    let tokens = run.recent_mean(RECENT_STEPS, |s| s.tokens_per_s);
    let gflops = run.recent_mean(RECENT_STEPS, |s| s.gflops);
    if compact {
        if let (Some(tps), Some(g)) = (tokens, gflops) {
            lines.push(kv("tokens/s", format!("{} · {g:.1} GFLOP/s", fmt_si(tps, ""))));
        }
    } else {
        if let Some(tps) = tokens {
            lines.push(kv("tokens/s", format!("{} (mean of {n})", fmt_si(tps, ""))));
        }
        if let Some(g) = gflops {
            lines.push(kv("GFLOP/s", format!("{g:.1}")));
        }
    }
    match &run.report {
        Some(r) => {
            lines.push(kv(
                "compile",
                format!("{:.2} s · {:.1} % · {} compiles", r.compile_seconds, 100.0 * r.compile_share, r.compiles),
            ));
            if !compact {
                lines.push(kv("total", format!("{:.1} GFLOP/s · device {:.1}", r.total_gflops, r.device_gflops)));
            }
        }
        None => lines.push(kv("compile", "in the report at the end")),
    }
    let stall = run.compile_stall_ms();
    // Below a twentieth of a millisecond the figure would print as 0.0.
    if stall >= 0.05 {
        lines.push(kv("stall", format!("{stall:.1} ms waiting for compiles")));
    }
    let count = |kind| run.markers.iter().filter(|m| m.kind == kind).count();
    let mut restarts = Line::from(vec![
        Span::styled(format!("{:<10}", "restarts"), LABEL),
        Span::styled(format!("{}", count(MarkerKind::Restart)), Style::new().fg(RESTART_COLOR)),
        Span::styled(" · resumes ", LABEL),
        Span::styled(format!("{}", count(MarkerKind::Resume)), Style::new().fg(RESUME_COLOR)),
    ]);
    if run.replayed_steps > 0 {
        restarts.push_span(Span::styled(format!(" · {} steps redone", run.replayed_steps), LABEL));
    }
    lines.push(restarts);
    lines
}

/// The measured process and power; `compact` puts CPU and RSS on one line.
fn system_lines(d: &Dashboard, compact: bool) -> Vec<Line<'static>> {
    let na = |reason: &str| Span::styled(format!("n/a: {reason}"), LABEL);
    let mut lines = Vec::new();
    match &d.process {
        Some((label, stats)) => {
            lines.push(kv("process", label.clone()));
            match stats {
                Ok(s) if compact => {
                    let cpu = s.cpu_percent.map_or("measuring…".to_string(), |p| format!("{p:.0} %"));
                    lines.push(kv("CPU, RSS", format!("{cpu} · {}", fmt_bytes(s.rss_bytes))));
                }
                Ok(s) => {
                    let cpu = s
                        .cpu_percent
                        .map_or("measuring…".to_string(), |p| format!("{p:.0} % of a core · {} cores here", d.cores));
                    lines.push(kv("CPU", cpu));
                    lines.push(kv("RSS", fmt_bytes(s.rss_bytes)));
                }
                Err(reason) => {
                    lines.push(Line::from(vec![Span::styled(format!("{:<10}", "CPU, RSS"), LABEL), na(reason)]))
                }
            }
        }
        None => lines.push(Line::from(vec![Span::styled(format!("{:<10}", "process"), LABEL), na("not measured")])),
    }
    let (what, power) = &d.power;
    let power_span = match power {
        Power::Watts { total, ane: Some(ane) } => Span::raw(format!("{total:.2} W (ANE {ane:.2} W) · {what}")),
        Power::Watts { total, ane: None } => Span::raw(format!("{total:.2} W · {what}")),
        Power::Measuring => Span::raw(format!("measuring… · {what}")),
        Power::Unavailable(reason) => na(reason),
    };
    lines.push(Line::from(vec![Span::styled(format!("{:<10}", "power"), LABEL), power_span]));
    lines
}

fn draw_sample(frame: &mut Frame, area: Rect, d: &Dashboard) {
    let (title, body) = match &d.sample {
        SampleState::Idle(reason) => ("sample".to_string(), Line::styled(reason.clone(), LABEL)),
        SampleState::Working { step, previous: None } => {
            (format!("sample · generating from step {step}…"), Line::styled("…", LABEL))
        }
        SampleState::Working { step, previous: Some(s) } => {
            (format!("sample · step {} · generating from step {step}…", s.step), sample_body(s))
        }
        SampleState::Done(s) => (format!("sample · step {} · {}", s.step, s.checkpoint.display()), sample_body(s)),
    };
    frame.render_widget(Paragraph::new(body).wrap(Wrap { trim: true }).block(panel(&title)), area);
}

fn sample_body(s: &SampleText) -> Line<'static> {
    match &s.text {
        Ok(text) if text.is_empty() => Line::styled("(the model ended the text at once)", LABEL),
        // Newlines in stories become visible separators: the panel has few rows.
        Ok(text) => Line::raw(text.replace('\n', " ⏎ ")),
        Err(e) => Line::styled(format!("n/a: {e}"), Style::new().red()),
    }
}

/// `1234567` → "1,234,567".
pub fn group_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `14728.2` → "14.7 k", `1.88e9` with "FLOP" → "1.88 GFLOP".
pub fn fmt_si(v: f64, unit: &str) -> String {
    const PREFIXES: [(f64, &str); 4] = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")];
    for (scale, prefix) in PREFIXES {
        if v.abs() >= scale {
            let x = v / scale;
            let decimals = if x.abs() >= 100.0 {
                0
            } else if x.abs() >= 10.0 {
                1
            } else {
                2
            };
            return format!("{x:.decimals$} {prefix}{unit}");
        }
    }
    if unit.is_empty() {
        format!("{v:.0}")
    } else {
        format!("{v:.0} {unit}")
    }
}

/// Bytes in binary units: "85.2 MiB".
pub fn fmt_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = "B";
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    if unit == "B" {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {unit}")
    }
}

/// Seconds as "0:07", "12:34" or "1:02:03".
pub fn fmt_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_formatted_for_people() {
        assert_eq!(group_thousands(229952), "229,952");
        assert_eq!(group_thousands(1_000_000), "1,000,000");
        assert_eq!(group_thousands(999), "999");
        assert_eq!(fmt_si(14728.2, ""), "14.7 k");
        assert_eq!(fmt_si(1.879e9, "FLOP"), "1.88 GFLOP");
        assert_eq!(fmt_si(229952.0, ""), "230 k");
        assert_eq!(fmt_si(12.0, ""), "12");
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(85 * 1024 * 1024 + 200 * 1024), "85.2 MiB");
        assert_eq!(fmt_duration(7.4), "0:07");
        assert_eq!(fmt_duration(754.0), "12:34");
        assert_eq!(fmt_duration(3723.0), "1:02:03");
    }

    #[test]
    fn bars_are_drawn_in_eighths() {
        assert_eq!(bar(1.0, 4), "████");
        assert_eq!(bar(0.5, 3), "█▌");
        assert_eq!(bar(0.0, 4), "");
        assert_eq!(bar(2.0, 2), "██", "clamped");
    }

    #[test]
    fn downsampling_keeps_the_extremes_of_every_bucket() {
        let points: Vec<(f64, f64)> =
            (0..1000).map(|i| (i as f64, if i == 537 { 99.0 } else { (i % 7) as f64 })).collect();
        let few = downsample(&points, 100);
        assert!(few.len() <= 100, "{}", few.len());
        assert!(few.contains(&(537.0, 99.0)), "the spike survives");
        assert!(few.windows(2).all(|w| w[0].0 < w[1].0), "x stays increasing");
        // A bucket's minimum is 0 (every 7th point): every bucket keeps one.
        assert_eq!(few.iter().filter(|p| p.1 == 0.0).count(), 50);
        assert_eq!(downsample(&points[..10], 100), points[..10].to_vec());
    }

    #[test]
    fn bounds_have_a_margin_and_are_never_empty() {
        assert_eq!(padded_bounds(std::iter::empty(), false), [0.0, 1.0]);
        let [lo, hi] = padded_bounds([2.0, 4.0].into_iter(), false);
        assert!(lo < 2.0 && hi > 4.0);
        let [lo, hi] = padded_bounds([5.0, 5.0].into_iter(), false);
        assert!(lo < 5.0 && hi > 5.0, "a flat series still has a range");
        assert_eq!(padded_bounds([3.0, 4.0].into_iter(), true)[0], 0.0);
        let [lo, hi] = padded_bounds([f64::NAN, 1.0, f64::INFINITY].into_iter(), false);
        assert!(lo < 1.0 && hi > 1.0 && hi.is_finite(), "non-finite values are skipped");
    }
}
