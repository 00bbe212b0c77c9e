//! PNG output, decoded with the `png` crate: the size asked for, not blank, each run in
//! its colour; and the errors a user can cause.

use std::path::{Path, PathBuf};

use dashboard::plot::{plot_files, PlotError};
use dashboard::run::RunLog;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/resumed_run.jsonl")
}

/// `(width, height, RGB bytes)` of a PNG.
fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).unwrap();
    assert_eq!((info.color_type, info.bit_depth), (png::ColorType::Rgb, png::BitDepth::Eight));
    pixels.truncate(info.buffer_size());
    (info.width, info.height, pixels)
}

fn count(pixels: &[u8], rgb: [u8; 3]) -> usize {
    pixels.chunks_exact(3).filter(|p| *p == rgb).count()
}

/// The first two colours of the plot's palette (Okabe & Ito's blue and vermillion).
const RUN_1: [u8; 3] = [0, 114, 178];
const RUN_2: [u8; 3] = [213, 94, 0];

#[test]
fn a_plot_has_the_asked_size_and_shows_each_run_in_its_colour() {
    let dir = tempfile::tempdir().unwrap();
    let a = RunLog::read_file(&fixture()).unwrap();
    // A second run: the same file with the loss shifted, so the curves do not coincide.
    let shifted: String = std::fs::read_to_string(fixture())
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            if v["event"] == "step" {
                v["loss"] = (v["loss"].as_f64().unwrap() + 0.5).into();
            }
            format!("{v}\n")
        })
        .collect();
    let b = RunLog::from_text(&shifted);

    let one = dir.path().join("one.png");
    plot_files(&[("a".into(), a.clone())], &one, (800, 600)).unwrap();
    let (w, h, pixels) = decode(&one);
    assert_eq!((w, h), (800, 600));
    let white = count(&pixels, [255, 255, 255]);
    assert!(white < (w * h) as usize * 97 / 100, "more than white: {white} of {} pixels", w * h);
    let distinct: std::collections::HashSet<&[u8]> = pixels.chunks_exact(3).collect();
    assert!(distinct.len() > 20, "text, axes and curves: {} colours", distinct.len());
    assert!(count(&pixels, RUN_1) > 500, "the run's curves are drawn in its colour");
    assert_eq!(count(&pixels, RUN_2), 0, "one run, one colour");

    let two = dir.path().join("two.png");
    plot_files(&[("a".into(), a), ("b".into(), b)], &two, (1000, 700)).unwrap();
    let (w, h, pixels) = decode(&two);
    assert_eq!((w, h), (1000, 700));
    assert!(count(&pixels, RUN_1) > 500 && count(&pixels, RUN_2) > 500, "both runs are drawn");
}

#[test]
fn plotting_nothing_or_too_small_or_nowhere_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let empty = plot_files(&[("empty".into(), RunLog::from_text("garbage\n"))], &out, (800, 600)).unwrap_err();
    assert!(matches!(empty, PlotError::Empty(ref m) if m.contains("empty")), "{empty}");
    let log = RunLog::read_file(&fixture()).unwrap();
    let small = plot_files(&[("a".into(), log.clone())], &out, (100, 600)).unwrap_err();
    assert_eq!(small.to_string(), "image size 100×600 is too small (at least 200×200 pixels)");
    let nowhere = dir.path().join("no/such/dir/x.png");
    let io = plot_files(&[("a".into(), log)], &nowhere, (800, 600)).unwrap_err();
    assert!(io.to_string().starts_with(&nowhere.display().to_string()), "{io}");
    assert!(!out.exists());
}

#[test]
fn a_screenshot_is_a_png_of_the_frame() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("frame.png");
    dashboard::app::screenshot(&fixture(), &out, (100, 30), None).unwrap();
    let (w, h, pixels) = decode(&out);
    // 9×18 pixels per cell.
    assert_eq!((w, h), (900, 540));
    let background = count(&pixels, [24, 26, 31]);
    assert!(background < (w * h) as usize * 95 / 100, "something is drawn: {background}");
    // The train curve's cyan dots.
    assert!(count(&pixels, [80, 200, 220]) > 50);
}
