//! PNG charts of finished (or running) runs: loss curves, train and validation, several
//! runs overlaid with a legend, and ms/step below them.
//!
//! Drawn with plotters' bitmap backend into memory and encoded with the `png` crate.
//! plotters' own font support (`ttf`) needs the system's fontconfig and FreeType; its
//! `ab_glyph` feature renders from bytes instead, so the DejaVu fonts are embedded from
//! the `dejavu` crate and the PNGs look the same on every machine.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::run::{MarkerKind, Run, RunLog};

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("nothing to plot: {0}")]
    Empty(String),
    #[error("image size {0}×{1} is too small (at least {MIN_SIZE}×{MIN_SIZE} pixels)")]
    TooSmall(u32, u32),
    #[error("drawing failed: {0}")]
    Draw(String),
    #[error("{path}: encoding the PNG: {message}")]
    Encode { path: PathBuf, message: String },
}

/// Smallest width and height that leaves room for axes and labels.
pub const MIN_SIZE: u32 = 200;

/// One colour per run, in order (a colour-blind-safe palette: Okabe & Ito, 2008).
const PALETTE: [RGBColor; 7] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 0, 0),
];

fn draw_err(e: impl std::fmt::Display) -> PlotError {
    PlotError::Draw(e.to_string())
}

/// Makes the embedded fonts known to plotters (once per process).
pub fn register_fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let fonts: [(&str, FontStyle, &'static [u8]); 3] = [
            ("sans-serif", FontStyle::Normal, dejavu::sans::regular()),
            ("sans-serif", FontStyle::Bold, dejavu::sans::bold()),
            ("monospace", FontStyle::Normal, dejavu::sans_mono::regular()),
        ];
        for (name, style, bytes) in fonts {
            // The bytes are a well-formed font shipped by the crate; a failure is a bug.
            plotters::style::register_font(name, style, bytes)
                .unwrap_or_else(|_| panic!("the embedded {name} font loads"));
        }
    });
}

/// The runs of several telemetry files, each labelled by its file; a file with several
/// runs labels them "name #1", "name #2", ….
pub fn label_runs(files: &[(String, RunLog)]) -> Vec<(String, &Run)> {
    let mut out = Vec::new();
    for (label, log) in files {
        let runs: Vec<&Run> = log.runs.iter().filter(|r| !r.steps.is_empty()).collect();
        for (i, run) in runs.iter().enumerate() {
            let label = if runs.len() > 1 { format!("{label} #{}", i + 1) } else { label.clone() };
            out.push((label, *run));
        }
    }
    out
}

/// Draws the loss and ms/step charts of the runs in `files` into a PNG at `out`.
pub fn plot_files(files: &[(String, RunLog)], out: &Path, size: (u32, u32)) -> Result<(), PlotError> {
    let runs = label_runs(files);
    if runs.is_empty() {
        let names: Vec<&str> = files.iter().map(|f| f.0.as_str()).collect();
        return Err(PlotError::Empty(format!("no step events in {}", names.join(", "))));
    }
    let rgb = render_runs(&runs, size)?;
    write_png(out, size, &rgb)
}

/// Draws the charts into an RGB buffer of `size` (3 bytes per pixel, row by row).
pub fn render_runs(runs: &[(String, &Run)], (width, height): (u32, u32)) -> Result<Vec<u8>, PlotError> {
    if width < MIN_SIZE || height < MIN_SIZE {
        return Err(PlotError::TooSmall(width, height));
    }
    register_fonts();
    let mut rgb = vec![0u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let (top, bottom) = root.split_vertically(height * 60 / 100);
        draw_loss(&top, runs)?;
        draw_ms(&bottom, runs)?;
        root.present().map_err(draw_err)?;
    }
    Ok(rgb)
}

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// `(lo, hi)` of the values with 5 % margins.
fn range(values: impl Iterator<Item = f64>, from_zero: bool) -> (f64, f64) {
    let (lo, hi) =
        values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let margin = ((hi - lo) * 0.05).max(hi.abs() * 1e-3).max(1e-6);
    (if from_zero { 0.0_f64.min(lo) } else { lo - margin }, hi + margin)
}

fn step_range(runs: &[(String, &Run)]) -> (f64, f64) {
    let last = runs.iter().filter_map(|(_, r)| r.last_step()).map(|s| s.step).max().unwrap_or(1);
    let first = runs.iter().filter_map(|(_, r)| r.steps.first()).map(|s| s.step).min().unwrap_or(1);
    (first.saturating_sub(1) as f64, last.max(first + 1) as f64)
}

fn draw_loss(area: &DrawingArea<BitMapBackend, Shift>, runs: &[(String, &Run)]) -> Result<(), PlotError> {
    let losses =
        runs.iter().flat_map(|(_, r)| r.steps.iter().map(|s| s.loss as f64).chain(r.evals.iter().map(|e| e.1 as f64)));
    let (y0, y1) = range(losses, false);
    let (x0, x1) = step_range(runs);
    let mut chart = ChartBuilder::on(area)
        .caption("loss", ("sans-serif", 24).into_font().style(FontStyle::Bold))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("cross-entropy")
        .label_style(("sans-serif", 14))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .max_light_lines(4)
        .light_line_style(RGBColor(238, 238, 238))
        .draw()
        .map_err(draw_err)?;
    for (i, (label, run)) in runs.iter().enumerate() {
        let c = color(i);
        let train = run.steps.iter().map(|s| (s.step as f64, s.loss as f64));
        chart
            .draw_series(LineSeries::new(train, c.stroke_width(2)))
            .map_err(draw_err)?
            .label(format!("{label} train"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
        if !run.evals.is_empty() {
            let val: Vec<(f64, f64)> = run.evals.iter().map(|&(s, v)| (s as f64, v as f64)).collect();
            chart
                .draw_series(DashedLineSeries::new(val.clone(), 6, 4, c.stroke_width(2)))
                .map_err(draw_err)?
                .label(format!("{label} val"))
                .legend(move |(x, y)| Circle::new((x + 10, y), 4, c.filled()));
            chart.draw_series(val.into_iter().map(|p| Circle::new(p, 4, c.filled()))).map_err(draw_err)?;
        }
        draw_markers(&mut chart, run, (y0, y1), c)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .draw()
        .map_err(draw_err)?;
    Ok(())
}

/// Dashed vertical lines, labelled, where a run restarted or resumed.
fn draw_markers<DB: DrawingBackend>(
    chart: &mut ChartContext<
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
    run: &Run,
    (y0, y1): (f64, f64),
    c: RGBColor,
) -> Result<(), PlotError> {
    for m in &run.markers {
        let x = m.step as f64;
        let name = match m.kind {
            MarkerKind::Restart => "restart",
            MarkerKind::Resume => "resume",
        };
        chart
            .draw_series(DashedLineSeries::new([(x, y0), (x, y1)], 5, 4, c.mix(0.8).stroke_width(1)))
            .map_err(draw_err)?;
        let label = Text::new(format!(" {name} @{}", m.step), (x, y1), ("sans-serif", 13).into_font().color(&c));
        chart.draw_series(std::iter::once(label)).map_err(draw_err)?;
    }
    Ok(())
}

fn draw_ms(area: &DrawingArea<BitMapBackend, Shift>, runs: &[(String, &Run)]) -> Result<(), PlotError> {
    let (y0, y1) = range(runs.iter().flat_map(|(_, r)| r.steps.iter().map(|s| s.ms)), true);
    let (x0, x1) = step_range(runs);
    let mut chart = ChartBuilder::on(area)
        .caption("time per step", ("sans-serif", 20).into_font().style(FontStyle::Bold))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("ms/step")
        .label_style(("sans-serif", 14))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .max_light_lines(4)
        .light_line_style(RGBColor(238, 238, 238))
        .draw()
        .map_err(draw_err)?;
    for (i, (label, run)) in runs.iter().enumerate() {
        let c = color(i);
        chart
            .draw_series(LineSeries::new(run.steps.iter().map(|s| (s.step as f64, s.ms)), c.stroke_width(1)))
            .map_err(draw_err)?
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
        draw_markers(&mut chart, run, (y0, y1), c)?;
    }
    if runs.len() > 1 {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .draw()
            .map_err(draw_err)?;
    }
    Ok(())
}

/// Writes an 8-bit RGB image as a PNG.
pub fn write_png(path: &Path, (width, height): (u32, u32), rgb: &[u8]) -> Result<(), PlotError> {
    let io = |source| PlotError::Io { path: path.to_path_buf(), source };
    let encode = |e: png::EncodingError| PlotError::Encode { path: path.to_path_buf(), message: e.to_string() };
    let file = std::fs::File::create(path).map_err(io)?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(encode)?;
    writer.write_image_data(rgb).map_err(encode)?;
    writer.finish().map_err(encode)
}
