//! A frame of the dashboard as a PNG: the cells of a ratatui buffer painted with the
//! embedded DejaVu Sans Mono, in the colours of a dark terminal. For looking at the UI
//! without a terminal (docs, CI artifacts, reviews).

use std::path::Path;

use plotters::prelude::{BitMapBackend, IntoDrawingArea, IntoFont, RGBColor, Rectangle};
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::Color as _;
use ratatui::buffer::Buffer;
use ratatui::style::{Color, Modifier};

use crate::plot::{register_fonts, write_png, PlotError};

/// Pixels per cell: DejaVu Sans Mono's advance is 0.6 em, so 15 px type is 9 px wide.
const CELL: (u32, u32) = (9, 18);
const FONT_PX: f64 = 15.0;
const BACKGROUND: RGBColor = RGBColor(24, 26, 31);
const FOREGROUND: RGBColor = RGBColor(212, 214, 218);

/// A terminal's 16 colours (xterm's defaults, softened a little for a dark background).
fn rgb(color: Color, default: RGBColor) -> RGBColor {
    match color {
        Color::Reset => default,
        Color::Black => RGBColor(0, 0, 0),
        Color::Red => RGBColor(224, 82, 82),
        Color::Green => RGBColor(110, 200, 110),
        Color::Yellow => RGBColor(230, 200, 80),
        Color::Blue => RGBColor(90, 140, 230),
        Color::Magenta => RGBColor(210, 110, 210),
        Color::Cyan => RGBColor(80, 200, 220),
        Color::Gray => RGBColor(190, 190, 190),
        Color::DarkGray => RGBColor(128, 132, 140),
        Color::LightRed => RGBColor(255, 120, 120),
        Color::LightGreen => RGBColor(150, 240, 150),
        Color::LightYellow => RGBColor(255, 240, 130),
        Color::LightBlue => RGBColor(140, 180, 255),
        Color::LightMagenta => RGBColor(255, 150, 255),
        Color::LightCyan => RGBColor(150, 240, 255),
        Color::White => RGBColor(255, 255, 255),
        Color::Rgb(r, g, b) => RGBColor(r, g, b),
        // The 256-colour cube is not used by the dashboard; show it as the default.
        Color::Indexed(_) => default,
    }
}

/// The raised dots of a Braille pattern character (U+2800–U+28FF) as `(column, row)`,
/// column 0–1, row 0–3. The embedded monospace font has no Braille glyphs, and ratatui's
/// charts are drawn in Braille, so the dots are painted directly.
fn braille_dots(symbol: &str) -> Option<Vec<(i32, i32)>> {
    let mut chars = symbol.chars();
    let c = chars.next()?;
    if chars.next().is_some() || !('\u{2800}'..='\u{28FF}').contains(&c) {
        return None;
    }
    let bits = c as u32 - 0x2800;
    // Unicode's dot numbering: bits 0–2 are dots 1–3 (left column, rows 0–2), bits 3–5
    // dots 4–6 (right column), bit 6 dot 7 (left, row 3), bit 7 dot 8 (right, row 3).
    const POSITIONS: [(i32, i32); 8] = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (0, 3), (1, 3)];
    Some((0..8).filter(|b| bits & (1 << b) != 0).map(|b| POSITIONS[b]).collect())
}

/// Paints `buffer` into an RGB image; returns it with its size in pixels.
pub fn render_buffer(buffer: &Buffer) -> Result<(Vec<u8>, (u32, u32)), PlotError> {
    register_fonts();
    let area = buffer.area;
    let size = (area.width as u32 * CELL.0, area.height as u32 * CELL.1);
    let mut pixels = vec![0u8; size.0 as usize * size.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, size).into_drawing_area();
        root.fill(&BACKGROUND).map_err(|e| PlotError::Draw(e.to_string()))?;
        for y in 0..area.height {
            for x in 0..area.width {
                let cell = &buffer[(area.x + x, area.y + y)];
                let (mut fg, mut bg) = (rgb(cell.fg, FOREGROUND), rgb(cell.bg, BACKGROUND));
                if cell.modifier.contains(Modifier::REVERSED) {
                    std::mem::swap(&mut fg, &mut bg);
                }
                let (px, py) = ((x as u32 * CELL.0) as i32, (y as u32 * CELL.1) as i32);
                if bg != BACKGROUND {
                    let rect = Rectangle::new([(px, py), (px + CELL.0 as i32, py + CELL.1 as i32)], bg.filled());
                    root.draw(&rect).map_err(|e| PlotError::Draw(e.to_string()))?;
                }
                let symbol = cell.symbol();
                if symbol.trim().is_empty() {
                    continue;
                }
                if let Some(dots) = braille_dots(symbol) {
                    for (col, row) in dots {
                        let (x0, y0) = (px + 2 + 4 * col, py + 2 + (9 * row) / 2);
                        let dot = Rectangle::new([(x0, y0), (x0 + 2, y0 + 2)], fg.filled());
                        root.draw(&dot).map_err(|e| PlotError::Draw(e.to_string()))?;
                    }
                    continue;
                }
                let style = ("monospace", FONT_PX).into_font().color(&fg).pos(Pos::new(HPos::Left, VPos::Center));
                let center = py + CELL.1 as i32 / 2;
                root.draw_text(symbol, &style, (px, center)).map_err(|e| PlotError::Draw(e.to_string()))?;
            }
        }
        root.present().map_err(|e| PlotError::Draw(e.to_string()))?;
    }
    Ok((pixels, size))
}

/// Writes `buffer` as a PNG at `path`.
pub fn write_buffer_png(buffer: &Buffer, path: &Path) -> Result<(), PlotError> {
    let (pixels, size) = render_buffer(buffer)?;
    write_png(path, size, &pixels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braille_characters_map_to_their_dots() {
        assert_eq!(braille_dots("\u{2800}"), Some(vec![]));
        assert_eq!(braille_dots("\u{2801}"), Some(vec![(0, 0)]));
        assert_eq!(braille_dots("\u{28C0}"), Some(vec![(0, 3), (1, 3)]));
        assert_eq!(braille_dots("\u{28FF}").unwrap().len(), 8);
        assert_eq!(braille_dots("a"), None);
        assert_eq!(braille_dots("\u{2801}\u{2801}"), None);
    }
}
