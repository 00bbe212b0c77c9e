//! Frames drawn to ratatui's `TestBackend` from a recorded telemetry file, read back cell
//! by cell. Expected numbers come from the fixture's JSON, read here with serde_json
//! alone (not through the dashboard's parser).

use std::path::PathBuf;

use dashboard::run::RunLog;
use dashboard::sampler::SampleText;
use dashboard::system::{Power, ProcStats};
use dashboard::ui::{self, Dashboard, SampleState, SourceStatus};
use ratatui::backend::TestBackend;
use ratatui::buffer::Buffer;
use ratatui::style::Color;
use ratatui::Terminal;
use serde_json::Value;

/// A real run: `anetrain train --steps 60 --eval-every 10 --ckpt-every 10` stopped with
/// `--stop-after 30`, then `--resume`d (see tests/data/README.md).
fn fixture_text() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/resumed_run.jsonl");
    std::fs::read_to_string(path).unwrap()
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn render(d: &Dashboard, width: u16, height: u16) -> Buffer {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
    terminal.draw(|f| ui::draw(f, d)).unwrap();
    terminal.backend().buffer().clone()
}

fn rows(buffer: &Buffer) -> Vec<String> {
    let area = buffer.area;
    (0..area.height).map(|y| (0..area.width).map(|x| buffer[(x, y)].symbol()).collect()).collect()
}

fn screen(buffer: &Buffer) -> String {
    rows(buffer).join("\n")
}

/// Columns of the loss chart holding braille dots of `color`: the block is found by its
/// title and corners, so the ms/step chart below it does not count.
fn loss_chart_columns(buffer: &Buffer, color: Color) -> std::collections::BTreeSet<u16> {
    let lines = rows(buffer);
    let top = lines.iter().position(|l| l.starts_with("┌ loss")).expect("a loss panel") as u16;
    let right = lines[top as usize].chars().position(|c| c == '┐').unwrap() as u16;
    let bottom = (top + 1..buffer.area.height).find(|&y| buffer[(0, y)].symbol() == "└").unwrap();
    let braille = |s: &str| s.chars().next().is_some_and(|c| ('\u{2801}'..='\u{28FF}').contains(&c));
    (top + 1..bottom)
        .flat_map(|y| (1..right).map(move |x| (x, y)))
        .filter(|&(x, y)| buffer[(x, y)].fg == color && braille(buffer[(x, y)].symbol()))
        .map(|(x, _)| x)
        .collect()
}

fn dashboard_of(text: &str) -> Dashboard {
    let mut d = Dashboard::new("following tests/data/resumed_run.jsonl");
    d.log = RunLog::from_text(text);
    d
}

#[test]
fn the_header_shows_the_title_latest_step_loss_and_validation() {
    let text = fixture_text();
    let lines = json_lines(&text);
    let last_step = lines.iter().rev().find(|v| v["event"] == "step").unwrap();
    let last_eval = lines.iter().rev().find(|v| v["event"] == "eval").unwrap();
    let buffer = render(&dashboard_of(&text), 120, 36);
    let header = &rows(&buffer)[0];
    assert!(header.starts_with(" anetrain "), "{header}");
    assert!(header.contains(&format!("step {}/60 (100 %)", last_step["step"])), "{header}");
    assert!(header.contains(&format!("loss {:.4}", last_step["loss"].as_f64().unwrap())), "{header}");
    let val = format!("val {:.4} @{}", last_eval["val_loss"].as_f64().unwrap(), last_eval["step"]);
    assert!(header.contains(&val), "{header}");
    assert!(header.contains("finished"), "the run has an `end` event: {header}");
    assert!(!header.contains("ETA"), "no ETA for a finished run: {header}");
}

#[test]
fn the_panels_show_config_phases_throughput_and_the_resume() {
    let text = fixture_text();
    let lines = json_lines(&text);
    let start = &lines[0];
    let steps: Vec<&Value> = lines.iter().filter(|v| v["event"] == "step").collect();
    // After the resume the run has steps 1..=60 once each; the mean is over the last 20.
    let recent = &steps[steps.len() - 20..];
    let mean = |f: &dyn Fn(&Value) -> f64| recent.iter().map(|v| f(v)).sum::<f64>() / 20.0;
    let backward = mean(&|v| v["phases_ms"]["device_backward"].as_f64().unwrap());
    let ms = mean(&|v| v["ms"].as_f64().unwrap());

    let s = screen(&render(&dashboard_of(&text), 120, 36));
    assert!(s.contains("dim 64 · hidden 192"), "{s}");
    assert!(s.contains("4 layers · 4 heads (2 kv)"), "{s}");
    let params = start["n_params"].as_u64().unwrap();
    assert_eq!(params, 229_952);
    assert!(s.contains("229,952"), "{s}");
    assert!(s.contains("cpu · fp32 · dynamic"), "{s}");
    assert!(s.contains(&format!("device_backward {}", "")), "{s}");
    assert!(s.contains(&format!("{backward:.1} ms")), "mean device_backward {backward:.1} ms:\n{s}");
    assert!(s.contains(&format!("ms/step · {ms:.1} mean of last 20")), "{s}");
    assert!(s.contains("resumes 1"), "{s}");
    assert!(s.contains("resume"), "the loss legend names the marker:\n{s}");
    let end = lines.last().unwrap();
    let compile = format!(
        "{:.2} s · {:.1} %",
        end["report"]["compile_seconds"].as_f64().unwrap(),
        100.0 * end["report"]["compile_share"].as_f64().unwrap()
    );
    assert!(s.contains(&compile), "{compile}:\n{s}");
    assert!(s.contains("76 lines · 0 malformed"), "{s}");
}

#[test]
fn the_resume_is_marked_on_the_loss_curve() {
    let buffer = render(&dashboard_of(&fixture_text()), 120, 36);
    // The marker is a vertical line in the resume colour, in one column.
    let columns = loss_chart_columns(&buffer, Color::Magenta);
    assert_eq!(columns.len(), 1, "{columns:?}");
    let height =
        (1..buffer.area.height).filter(|&y| buffer[(*columns.first().unwrap(), y)].fg == Color::Magenta).count();
    assert!(height >= 5, "several rows tall: {height}");
}

#[test]
fn exec_restarts_are_marked_in_red_and_counted() {
    // A run the compile budget restarted twice (see tests/data/README.md).
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/restarted_run.jsonl");
    let text = std::fs::read_to_string(path).unwrap();
    let restarts: Vec<u64> =
        json_lines(&text).iter().filter(|v| v["event"] == "restart").map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(restarts, [16, 31]);
    let d = dashboard_of(&text);
    let run = d.log.current().unwrap();
    assert_eq!(run.steps.iter().map(|s| s.step).collect::<Vec<_>>(), (1..=40).collect::<Vec<_>>());
    assert_eq!(run.processes, 3);
    let buffer = render(&d, 120, 36);
    let s = screen(&buffer);
    assert!(s.contains("restarts  2 · resumes 0"), "{s}");
    // Two red columns in the loss chart, at steps 16 and 31 of its 0..40 axis.
    let columns = loss_chart_columns(&buffer, Color::Red);
    assert_eq!(columns.len(), 2, "{columns:?}\n{s}");
    let (a, b) = (*columns.first().unwrap(), *columns.last().unwrap());
    // The plot starts after the y labels ("│6.31│"); step 40 is its last column.
    let origin = rows(&buffer)[2].chars().enumerate().filter(|&(_, c)| c == '│').nth(1).unwrap().0 as f64;
    let (a, b) = (a as f64 - origin, b as f64 - origin);
    assert!(((b - a) / a - (31.0 - 16.0) / 16.0).abs() < 0.1, "spaced like steps 16 and 31 (from 0): {a}, {b}");
}

#[test]
fn a_run_in_progress_shows_its_progress_and_eta() {
    let text = fixture_text();
    // The first 25 lines: the start event and steps up to 22 (with 2 evals, 2 checkpoints).
    let head: String = text.lines().take(25).map(|l| format!("{l}\n")).collect();
    let lines = json_lines(&head);
    let last = lines.iter().rev().find(|v| v["event"] == "step").unwrap();
    let mut d = dashboard_of(&head);
    d.status = SourceStatus::Running;
    let header = rows(&render(&d, 120, 36))[0].clone();
    let n = last["step"].as_u64().unwrap();
    assert!(header.contains(&format!("step {n}/60 ({:.0} %)", 100.0 * n as f64 / 60.0)), "{header}");
    assert!(header.contains("ETA 0:0"), "{header}");
    assert!(header.contains("running"), "{header}");
}

#[test]
fn malformed_lines_are_counted_and_the_last_one_is_named() {
    let text = fixture_text();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.insert(3, "this is not json");
    let truncated = &lines[10][..50].to_string();
    lines[10] = truncated;
    let s = screen(&render(&dashboard_of(&lines.join("\n")), 160, 36));
    let footer = s.lines().last().unwrap();
    assert!(footer.contains("77 lines · 2 malformed"), "{footer}");
    assert!(footer.contains("(last: line 11: "), "{footer}");
}

#[test]
fn an_empty_dashboard_waits() {
    let s = screen(&render(&Dashboard::new("following nothing.jsonl"), 100, 30));
    assert!(s.lines().next().unwrap().contains("waiting for telemetry…"), "{s}");
    assert!(s.contains("no start event yet"));
    assert!(s.contains("no steps yet"));
}

#[test]
fn system_and_sample_panels_show_numbers_or_the_reason() {
    let mut d = dashboard_of(&fixture_text());
    d.process = Some(("training, pid 42".into(), Ok(ProcStats { cpu_percent: Some(187.0), rss_bytes: 90 << 20 })));
    d.cores = 2;
    d.power = ("CPU package 0 (RAPL)".into(), Power::Watts { total: 12.5, ane: None });
    d.sample = SampleState::Done(SampleText {
        step: 60,
        checkpoint: "run/ckpt.bin".into(),
        text: Ok("Once upon a time\nthere was a cat.".into()),
    });
    d.child_log = Some("/tmp/x/train.log".into());
    d.read_error = Some("reading t.jsonl: Permission denied".into());
    let s = screen(&render(&d, 140, 40));
    assert!(s.contains("0 malformed · reading t.jsonl: Permission denied"), "{s}");
    assert!(s.contains("training, pid 42"), "{s}");
    assert!(s.contains("187 % of a core · 2 cores here"), "{s}");
    assert!(s.contains("90.0 MiB"), "{s}");
    assert!(s.contains("12.50 W · CPU package 0 (RAPL)"), "{s}");
    assert!(s.contains("sample · step 60 · run/ckpt.bin"), "{s}");
    assert!(s.contains("Once upon a time ⏎ there was a cat."), "{s}");
    assert!(s.contains("training log: /tmp/x/train.log"), "{s}");

    d.process = Some(("training, pid 42".into(), Err("no /proc here".into())));
    d.power = ("power".into(), Power::Unavailable("no RAPL here".into()));
    d.sample = SampleState::Working {
        step: 70,
        previous: Some(SampleText { step: 60, checkpoint: "c.bin".into(), text: Err("c.bin: not found".into()) }),
    };
    d.status = SourceStatus::Exited { success: false, how: "exit 1".into() };
    let s = screen(&render(&d, 140, 40));
    assert!(s.contains("n/a: no /proc here"), "{s}");
    assert!(s.contains("n/a: no RAPL here"), "{s}");
    assert!(s.contains("sample · step 60 · generating from step 70…"), "{s}");
    assert!(s.contains("n/a: c.bin: not found"), "{s}");
    assert!(s.lines().next().unwrap().contains("training failed (exit 1)"), "{s}");
}

#[test]
fn an_80_by_24_terminal_shows_every_panel() {
    let mut d = dashboard_of(&fixture_text());
    d.process = Some(("training, pid 42".into(), Ok(ProcStats { cpu_percent: Some(95.0), rss_bytes: 64 << 20 })));
    d.power = ("power".into(), Power::Unavailable("no RAPL here".into()));
    let s = screen(&render(&d, 80, 24));
    for needle in [
        "step 60/60",
        "loss",
        "ms/step",
        "phases",
        "device_backward",
        "other",
        "tokens/s",
        "compile",
        "resumes 1",
        "training, pid 42",
        "95 % · 64.0 MiB",
        "n/a: no RAPL here",
        "sample",
        "76 lines",
    ] {
        assert!(s.contains(needle), "no `{needle}` at 80×24:\n{s}");
    }
    // Taller, the settings summary appears too.
    let s = screen(&render(&d, 80, 30));
    assert!(s.contains("dim 64 · hidden 192 · 4 layers"), "{s}");
}

#[test]
fn a_resized_terminal_is_redrawn_at_its_new_size() {
    let d = dashboard_of(&fixture_text());
    let mut terminal = Terminal::new(TestBackend::new(120, 36)).unwrap();
    terminal.draw(|f| ui::draw(f, &d)).unwrap();
    for (w, h) in [(80, 24), (200, 60), (40, 12)] {
        terminal.backend_mut().resize(w, h);
        terminal.draw(|f| ui::draw(f, &d)).unwrap();
        let buffer = terminal.backend().buffer();
        assert_eq!((buffer.area.width, buffer.area.height), (w, h));
        let s = screen(buffer);
        assert!(s.lines().next().unwrap().starts_with(" anetrain "), "{w}×{h}:\n{s}");
        if w >= ui::MIN_SIZE.0 && h >= ui::MIN_SIZE.1 {
            assert!(s.contains("phases"), "{w}×{h}:\n{s}");
        } else {
            assert!(s.contains("terminal too small: 40×12"), "{w}×{h}:\n{s}");
        }
    }
}
