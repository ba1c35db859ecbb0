//! Training curves as a PNG, drawn without any font or plotting dependency: three panels
//! (training loss against step, learning rate against step, top-1/top-5 against epoch) with
//! ticks labelled in the public-domain X11 "6x13" bitmap font, embedded below. (`plotters` with
//! its bitmap backend needs a font crate and a font file to draw any text, and brings 26 crates,
//! among them a second `image` (0.24): 1 min 47 s of release build on the 2-core machine.)
//!
//! Input: JSON lines as the trainer writes them to `metrics.jsonl`. A line with `top1`, `top5`
//! or `val_loss` is an evaluation (plotted against `epoch`, and `val_loss` against `step` in
//! the loss panel when it has one); any other line with `loss` or `lr` is a training step
//! (plotted against `step`, or its position among the training lines if it has none).
//! Missing fields, `null`, `NaN` and infinities (Python's `json.dumps` writes bare `NaN`) leave
//! a gap in the curve; lines that are not JSON objects are counted and skipped.

use std::path::Path;

use anyhow::{Context, Result};
use image::{Rgb, RgbImage};

/// Width of the PNG in pixels.
pub const WIDTH_PX: u32 = 1500;
/// Height of the PNG in pixels.
pub const HEIGHT_PX: u32 = 480;

/// One training line.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainPoint {
    /// Optimiser step (x axis).
    pub step: f64,
    /// Training loss, NaN if missing.
    pub loss: f64,
    /// Learning rate, NaN if missing.
    pub lr: f64,
}

/// One evaluation line.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalPoint {
    /// Epoch (x axis of the accuracy panel).
    pub epoch: f64,
    /// Step, NaN if missing (x of `val_loss` in the loss panel).
    pub step: f64,
    /// Top-1 accuracy, NaN if missing.
    pub top1: f64,
    /// Top-5 accuracy, NaN if missing.
    pub top5: f64,
    /// Validation loss, NaN if missing.
    pub val_loss: f64,
}

/// The parsed contents of a metrics file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metrics {
    /// Training lines, in file order.
    pub train: Vec<TrainPoint>,
    /// Evaluation lines, in file order.
    pub eval: Vec<EvalPoint>,
    /// Non-empty lines that are not JSON objects (skipped).
    pub num_bad_lines: usize,
}

fn field(v: &serde_json::Value, name: &str) -> f64 {
    v.get(name)
        .and_then(serde_json::Value::as_f64)
        .filter(|x| x.is_finite())
        .unwrap_or(f64::NAN)
}

/// Replaces the bare `NaN`, `Infinity` and `-Infinity` that Python's `json` writes by `null`.
fn python_nan_to_null(line: &str) -> String {
    line.replace("-Infinity", "null")
        .replace("Infinity", "null")
        .replace("NaN", "null")
}

/// Parses metrics JSON lines (see the module docs).
pub fn parse_metrics(text: &str) -> Metrics {
    let mut m = Metrics::default();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let v: serde_json::Value = match serde_json::from_str(line)
            .or_else(|_| serde_json::from_str(&python_nan_to_null(line)))
        {
            Ok(v @ serde_json::Value::Object(_)) => v,
            _ => {
                m.num_bad_lines += 1;
                continue;
            }
        };
        let has = |k: &str| v.get(k).is_some();
        if has("top1") || has("top5") || has("val_loss") {
            let epoch = field(&v, "epoch");
            m.eval.push(EvalPoint {
                epoch: if epoch.is_nan() {
                    m.eval.len() as f64
                } else {
                    epoch
                },
                step: field(&v, "step"),
                top1: field(&v, "top1"),
                top5: field(&v, "top5"),
                val_loss: field(&v, "val_loss"),
            });
        } else if has("loss") || has("lr") {
            let step = field(&v, "step");
            m.train.push(TrainPoint {
                step: if step.is_nan() {
                    m.train.len() as f64
                } else {
                    step
                },
                loss: field(&v, "loss"),
                lr: field(&v, "lr"),
            });
        }
    }
    m
}

/// Reads a metrics file (see the module docs).
pub fn read_metrics(path: &Path) -> Result<Metrics> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(parse_metrics(&text))
}

/// Reads `metrics_jsonl_path` and writes the three-panel plot to `out_png_path`
/// ([`WIDTH_PX`] x [`HEIGHT_PX`]). Returns what was read.
pub fn plot_metrics(metrics_jsonl_path: &Path, out_png_path: &Path) -> Result<Metrics> {
    let m = read_metrics(metrics_jsonl_path)?;
    render_metrics(&m)
        .save_with_format(out_png_path, image::ImageFormat::Png)
        .with_context(|| format!("writing {}", out_png_path.display()))?;
    Ok(m)
}

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const BLACK: Rgb<u8> = Rgb([0, 0, 0]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
const TEXT: Rgb<u8> = Rgb([40, 40, 40]);
/// Series colours (matplotlib's first two).
const BLUE: Rgb<u8> = Rgb([31, 119, 180]);
const ORANGE: Rgb<u8> = Rgb([255, 127, 14]);
const LIGHT_BLUE: Rgb<u8> = Rgb([170, 200, 230]);

/// A panel's plotting area in pixels: left, top, width, height.
#[derive(Clone, Copy, Debug)]
struct Rect {
    x: i64,
    y: i64,
    w: i64,
    h: i64,
}

const PANEL_W: i64 = WIDTH_PX as i64 / 3;
const MARGIN_LEFT: i64 = 78;
const MARGIN_RIGHT: i64 = 22;
const MARGIN_TOP: i64 = 34;
const MARGIN_BOTTOM: i64 = 46;

fn plot_area(panel: usize) -> Rect {
    Rect {
        x: panel as i64 * PANEL_W + MARGIN_LEFT,
        y: MARGIN_TOP,
        w: PANEL_W - MARGIN_LEFT - MARGIN_RIGHT,
        h: HEIGHT_PX as i64 - MARGIN_TOP - MARGIN_BOTTOM,
    }
}

struct Canvas(RgbImage);

impl Canvas {
    fn put(&mut self, x: i64, y: i64, c: Rgb<u8>) {
        if x >= 0 && y >= 0 && x < self.0.width() as i64 && y < self.0.height() as i64 {
            self.0.put_pixel(x as u32, y as u32, c);
        }
    }

    fn hline(&mut self, x0: i64, x1: i64, y: i64, c: Rgb<u8>) {
        for x in x0..=x1 {
            self.put(x, y, c);
        }
    }

    fn vline(&mut self, x: i64, y0: i64, y1: i64, c: Rgb<u8>) {
        for y in y0..=y1 {
            self.put(x, y, c);
        }
    }

    /// A line two pixels wide (Bresenham, each point drawn as a 2 x 2 block).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb<u8>) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            for (ox, oy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                self.put(x + ox, y + oy, c);
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn marker(&mut self, x: i64, y: i64, c: Rgb<u8>) {
        for oy in -3..=3i64 {
            for ox in -3..=3i64 {
                if ox * ox + oy * oy <= 10 {
                    self.put(x + ox, y + oy, c);
                }
            }
        }
    }

    /// Text in the 6x13 font with its top-left corner at (x, y).
    fn text(&mut self, x: i64, y: i64, s: &str, c: Rgb<u8>) {
        for (i, ch) in s.chars().enumerate() {
            let code = ch as u32;
            let glyph = if (32..127).contains(&code) {
                &FONT_6X13[(code - 32) as usize]
            } else {
                &FONT_6X13[('?' as u32 - 32) as usize]
            };
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..GLYPH_W {
                    if bits & (1 << (GLYPH_W - 1 - col)) != 0 {
                        self.put(x + i as i64 * GLYPH_W + col, y + row as i64, c);
                    }
                }
            }
        }
    }

    /// A bold (drawn twice, one pixel apart) title centred above the plotting area.
    fn title(&mut self, r: Rect, s: &str) {
        let x = r.x + (r.w - Self::text_width(s)) / 2;
        self.text(x, r.y - 22, s, BLACK);
        self.text(x + 1, r.y - 22, s, BLACK);
    }

    fn text_width(s: &str) -> i64 {
        s.chars().count() as i64 * GLYPH_W
    }
}

/// A data range padded for plotting, and ticks at round values (1, 2 or 5 times a power of 10).
#[derive(Clone, Debug, PartialEq)]
struct Axis {
    min: f64,
    max: f64,
    ticks: Vec<f64>,
    step: f64,
}

impl Axis {
    /// The axis for `values` (non-finite ones ignored); `pad` adds that fraction of the span on
    /// both sides.
    fn fit(values: impl Iterator<Item = f64>, pad: f64) -> Option<Axis> {
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for v in values.filter(|v| v.is_finite()) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if lo > hi {
            return None;
        }
        if hi - lo <= f64::EPSILON * hi.abs().max(lo.abs()).max(1e-300) {
            let d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
            (lo, hi) = (lo - d, hi + d);
        } else {
            let d = (hi - lo) * pad;
            (lo, hi) = (lo - d, hi + d);
        }
        let raw = (hi - lo) / 8.0;
        let mag = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 5.0, 10.0]
            .into_iter()
            .map(|f| f * mag)
            .find(|s| *s >= raw * (1.0 - 1e-9))
            .unwrap_or(10.0 * mag);
        let first = (lo / step).ceil() as i64;
        let last = (hi / step).floor() as i64;
        let ticks = (first..=last).map(|i| i as f64 * step).collect();
        Some(Axis {
            min: lo,
            max: hi,
            ticks,
            step,
        })
    }

    /// Ticks at whole numbers only (for steps and epochs).
    fn whole(mut self) -> Axis {
        if self.step < 1.0 {
            self.step = 1.0;
            self.ticks = (self.min.ceil() as i64..=self.max.floor() as i64)
                .map(|i| i as f64)
                .collect();
        }
        self
    }

    /// A tick label: as many decimals as the step needs, or scientific notation for very small
    /// or very large steps.
    fn label(&self, v: f64) -> String {
        let v = if v.abs() < self.step * 1e-9 { 0.0 } else { v };
        let a = self.step.abs();
        if a < 1e-3 || v.abs() >= 1e6 {
            let s = format!("{v:.1e}");
            // 5.0e-4 -> 5e-4
            s.replace(".0e", "e")
        } else {
            let decimals = (-a.log10().floor()).max(0.0) as usize;
            format!("{v:.decimals$}")
        }
    }
}

/// Maps data to pixels inside a plotting area.
struct Frame {
    r: Rect,
    x: Axis,
    y: Axis,
}

impl Frame {
    fn px(&self, x: f64, y: f64) -> (i64, i64) {
        let fx = (x - self.x.min) / (self.x.max - self.x.min);
        let fy = (y - self.y.min) / (self.y.max - self.y.min);
        (
            self.r.x + (fx * (self.r.w - 1) as f64).round() as i64,
            self.r.y + self.r.h - 1 - (fy * (self.r.h - 1) as f64).round() as i64,
        )
    }

    fn draw_axes(&self, c: &mut Canvas, title: &str, x_title: &str) {
        let r = self.r;
        for &t in &self.y.ticks {
            let (_, py) = self.px(self.x.min, t);
            c.hline(r.x + 1, r.x + r.w - 2, py, GRID);
            c.hline(r.x - 5, r.x - 1, py, BLACK);
            let s = self.y.label(t);
            c.text(r.x - 8 - Canvas::text_width(&s), py - 6, &s, TEXT);
        }
        let mut last_label_end = i64::MIN;
        for &t in &self.x.ticks {
            let (px, _) = self.px(t, self.y.min);
            c.vline(px, r.y + 1, r.y + r.h - 2, GRID);
            c.vline(px, r.y + r.h, r.y + r.h + 4, BLACK);
            let s = self.x.label(t);
            let left = px - Canvas::text_width(&s) / 2;
            if left > last_label_end + 6 {
                c.text(left, r.y + r.h + 7, &s, TEXT);
                last_label_end = left + Canvas::text_width(&s);
            }
        }
        c.hline(r.x - 1, r.x + r.w, r.y - 1, BLACK);
        c.hline(r.x - 1, r.x + r.w, r.y + r.h, BLACK);
        c.vline(r.x - 1, r.y - 1, r.y + r.h, BLACK);
        c.vline(r.x + r.w, r.y - 1, r.y + r.h, BLACK);
        c.title(r, title);
        c.text(
            r.x + (r.w - Canvas::text_width(x_title)) / 2,
            r.y + r.h + 26,
            x_title,
            TEXT,
        );
    }

    /// A polyline through the finite points, broken where a value is missing; a lone point
    /// (no finite neighbour) gets a marker so that it shows.
    fn series(&self, c: &mut Canvas, pts: &[(f64, f64)], colour: Rgb<u8>, markers: bool) {
        let ok = |p: &(f64, f64)| p.0.is_finite() && p.1.is_finite();
        for (i, p) in pts.iter().enumerate() {
            if !ok(p) {
                continue;
            }
            let a = self.px(p.0, p.1);
            let next = pts.get(i + 1).filter(|q| ok(q));
            if let Some(q) = next {
                c.line(a, self.px(q.0, q.1), colour);
            }
            let prev_ok = i > 0 && ok(&pts[i - 1]);
            if markers || (next.is_none() && !prev_ok) {
                c.marker(a.0, a.1, colour);
            }
        }
    }

    fn legend(&self, c: &mut Canvas, entries: &[(&str, Rgb<u8>)]) {
        let mut y = self.r.y + 8;
        for (name, colour) in entries {
            let x = self.r.x + self.r.w - 12 - Canvas::text_width(name) - 26;
            c.line((x, y + 6), (x + 18, y + 6), *colour);
            c.text(x + 24, y, name, TEXT);
            y += 16;
        }
    }
}

fn no_data(c: &mut Canvas, panel: usize, title: &str) {
    let r = plot_area(panel);
    c.hline(r.x - 1, r.x + r.w, r.y - 1, BLACK);
    c.hline(r.x - 1, r.x + r.w, r.y + r.h, BLACK);
    c.vline(r.x - 1, r.y - 1, r.y + r.h, BLACK);
    c.vline(r.x + r.w, r.y - 1, r.y + r.h, BLACK);
    c.title(r, title);
    let s = "no data";
    c.text(
        r.x + (r.w - Canvas::text_width(s)) / 2,
        r.y + r.h / 2 - 6,
        s,
        TEXT,
    );
}

/// A trailing moving average over `window` finite values (NaN where the input is NaN).
fn moving_average(values: &[f64], window: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(values.len());
    let mut buf = std::collections::VecDeque::with_capacity(window);
    let mut sum = 0.0;
    for &v in values {
        if !v.is_finite() {
            out.push(f64::NAN);
            continue;
        }
        buf.push_back(v);
        sum += v;
        if buf.len() > window {
            sum -= buf.pop_front().expect("non-empty");
        }
        out.push(sum / buf.len() as f64);
    }
    out
}

/// Draws the three panels.
pub fn render_metrics(m: &Metrics) -> RgbImage {
    let mut c = Canvas(RgbImage::from_pixel(WIDTH_PX, HEIGHT_PX, WHITE));

    // 1. Loss against step: raw (light) and, with many points, a moving average; val loss.
    let loss: Vec<(f64, f64)> = m.train.iter().map(|p| (p.step, p.loss)).collect();
    let val: Vec<(f64, f64)> = m
        .eval
        .iter()
        .map(|p| (p.step, p.val_loss))
        .filter(|p| p.0.is_finite())
        .collect();
    let title = "training loss";
    let finite = |pts: &[(f64, f64)]| pts.iter().any(|p| p.0.is_finite() && p.1.is_finite());
    if finite(&loss) || finite(&val) {
        let ok = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
        let f = Frame {
            r: plot_area(0),
            x: Axis::fit(loss.iter().chain(&val).filter(ok).map(|p| p.0), 0.02)
                .expect("finite")
                .whole(),
            y: Axis::fit(loss.iter().chain(&val).filter(ok).map(|p| p.1), 0.05).expect("finite"),
        };
        f.draw_axes(&mut c, title, "step");
        let mut legend = Vec::new();
        if loss.len() > 100 {
            f.series(&mut c, &loss, LIGHT_BLUE, false);
            let ys: Vec<f64> = loss.iter().map(|p| p.1).collect();
            let avg = moving_average(&ys, loss.len() / 50);
            let avg: Vec<(f64, f64)> = loss.iter().zip(avg).map(|(p, a)| (p.0, a)).collect();
            f.series(&mut c, &avg, BLUE, false);
            legend.push(("train (moving avg)", BLUE));
        } else {
            f.series(&mut c, &loss, BLUE, false);
            legend.push(("train", BLUE));
        }
        if finite(&val) {
            f.series(&mut c, &val, ORANGE, val.len() <= 30);
            legend.push(("val", ORANGE));
        }
        f.legend(&mut c, &legend);
    } else {
        no_data(&mut c, 0, title);
    }

    // 2. Learning rate against step.
    let lr: Vec<(f64, f64)> = m.train.iter().map(|p| (p.step, p.lr)).collect();
    let title = "learning rate";
    if finite(&lr) {
        let ok = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
        let mut y = Axis::fit(lr.iter().filter(ok).map(|p| p.1), 0.05).expect("finite");
        // Learning rates start (warm-up) and end (cosine) near 0: show 0 when it is close.
        if y.min > 0.0 && y.min < (y.max - y.min) * 0.5 {
            y = Axis::fit(lr.iter().filter(ok).map(|p| p.1).chain([0.0]), 0.05).expect("finite");
        }
        let f = Frame {
            r: plot_area(1),
            x: Axis::fit(lr.iter().filter(ok).map(|p| p.0), 0.02)
                .expect("finite")
                .whole(),
            y,
        };
        f.draw_axes(&mut c, title, "step");
        f.series(&mut c, &lr, BLUE, false);
    } else {
        no_data(&mut c, 1, title);
    }

    // 3. Accuracy against epoch.
    let top1: Vec<(f64, f64)> = m.eval.iter().map(|p| (p.epoch, p.top1)).collect();
    let top5: Vec<(f64, f64)> = m.eval.iter().map(|p| (p.epoch, p.top5)).collect();
    let title = "top-1 / top-5 accuracy";
    if finite(&top1) || finite(&top5) {
        let ok = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
        let f = Frame {
            r: plot_area(2),
            x: Axis::fit(top1.iter().chain(&top5).filter(ok).map(|p| p.0), 0.02)
                .expect("finite")
                .whole(),
            y: Axis::fit(top1.iter().chain(&top5).filter(ok).map(|p| p.1), 0.05).expect("finite"),
        };
        f.draw_axes(&mut c, title, "epoch");
        let markers = m.eval.len() <= 30;
        f.series(&mut c, &top5, ORANGE, markers);
        f.series(&mut c, &top1, BLUE, markers);
        // Put the legend where the curves are not: accuracy rises, so bottom right is free.
        let f_low = Frame {
            r: Rect {
                y: f.r.y + f.r.h - 44,
                ..f.r
            },
            x: f.x.clone(),
            y: f.y.clone(),
        };
        f_low.legend(&mut c, &[("top-1", BLUE), ("top-5", ORANGE)]);
    } else {
        no_data(&mut c, 2, title);
    }
    c.0
}

const GLYPH_W: i64 = 6;

/// X11 misc-fixed "6x13" (public domain), ASCII 32 to 126: 13 rows per glyph, 6 bits per row,
/// the leftmost pixel in bit 5.
#[rustfmt::skip]
const FONT_6X13: [[u8; 13]; 95] = [
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // ' '
    [0x00, 0x00, 0x08, 0x08, 0x08, 0x08, 0x08, 0x08, 0x08, 0x00, 0x08, 0x00, 0x00], // '!'
    [0x00, 0x00, 0x14, 0x14, 0x14, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // '"'
    [0x00, 0x00, 0x00, 0x14, 0x14, 0x3e, 0x14, 0x3e, 0x14, 0x14, 0x00, 0x00, 0x00], // '#'
    [0x00, 0x00, 0x08, 0x1e, 0x28, 0x28, 0x1c, 0x0a, 0x0a, 0x3c, 0x08, 0x00, 0x00], // '$'
    [0x00, 0x00, 0x12, 0x2a, 0x14, 0x04, 0x08, 0x10, 0x14, 0x2a, 0x24, 0x00, 0x00], // '%'
    [0x00, 0x00, 0x00, 0x10, 0x28, 0x28, 0x10, 0x28, 0x26, 0x24, 0x1a, 0x00, 0x00], // '&'
    [0x00, 0x00, 0x08, 0x08, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // "'"
    [0x00, 0x04, 0x08, 0x08, 0x10, 0x10, 0x10, 0x10, 0x10, 0x08, 0x08, 0x04, 0x00], // '('
    [0x00, 0x10, 0x08, 0x08, 0x04, 0x04, 0x04, 0x04, 0x04, 0x08, 0x08, 0x10, 0x00], // ')'
    [0x00, 0x00, 0x08, 0x2a, 0x1c, 0x2a, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // '*'
    [0x00, 0x00, 0x00, 0x00, 0x08, 0x08, 0x3e, 0x08, 0x08, 0x00, 0x00, 0x00, 0x00], // '+'
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0c, 0x08, 0x10, 0x00], // ','
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x3e, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // '-'
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x08, 0x1c, 0x08, 0x00], // '.'
    [0x00, 0x00, 0x02, 0x02, 0x04, 0x04, 0x08, 0x10, 0x10, 0x20, 0x20, 0x00, 0x00], // '/'
    [0x00, 0x00, 0x08, 0x14, 0x22, 0x22, 0x22, 0x22, 0x22, 0x14, 0x08, 0x00, 0x00], // '0'
    [0x00, 0x00, 0x08, 0x18, 0x28, 0x08, 0x08, 0x08, 0x08, 0x08, 0x3e, 0x00, 0x00], // '1'
    [0x00, 0x00, 0x1c, 0x22, 0x22, 0x02, 0x04, 0x08, 0x10, 0x20, 0x3e, 0x00, 0x00], // '2'
    [0x00, 0x00, 0x3e, 0x02, 0x04, 0x08, 0x1c, 0x02, 0x02, 0x22, 0x1c, 0x00, 0x00], // '3'
    [0x00, 0x00, 0x04, 0x04, 0x0c, 0x14, 0x14, 0x24, 0x3e, 0x04, 0x04, 0x00, 0x00], // '4'
    [0x00, 0x00, 0x3e, 0x20, 0x20, 0x2c, 0x32, 0x02, 0x02, 0x22, 0x1c, 0x00, 0x00], // '5'
    [0x00, 0x00, 0x1c, 0x22, 0x20, 0x20, 0x3c, 0x22, 0x22, 0x22, 0x1c, 0x00, 0x00], // '6'
    [0x00, 0x00, 0x3e, 0x02, 0x04, 0x04, 0x08, 0x08, 0x10, 0x10, 0x10, 0x00, 0x00], // '7'
    [0x00, 0x00, 0x1c, 0x22, 0x22, 0x22, 0x1c, 0x22, 0x22, 0x22, 0x1c, 0x00, 0x00], // '8'
    [0x00, 0x00, 0x1c, 0x22, 0x22, 0x22, 0x1e, 0x02, 0x02, 0x22, 0x1c, 0x00, 0x00], // '9'
    [0x00, 0x00, 0x00, 0x00, 0x08, 0x1c, 0x08, 0x00, 0x00, 0x08, 0x1c, 0x08, 0x00], // ':'
    [0x00, 0x00, 0x00, 0x00, 0x08, 0x1c, 0x08, 0x00, 0x00, 0x0c, 0x08, 0x10, 0x00], // ';'
    [0x00, 0x00, 0x02, 0x04, 0x08, 0x10, 0x20, 0x10, 0x08, 0x04, 0x02, 0x00, 0x00], // '<'
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x3e, 0x00, 0x00, 0x3e, 0x00, 0x00, 0x00, 0x00], // '='
    [0x00, 0x00, 0x20, 0x10, 0x08, 0x04, 0x02, 0x04, 0x08, 0x10, 0x20, 0x00, 0x00], // '>'
    [0x00, 0x00, 0x1c, 0x22, 0x22, 0x02, 0x04, 0x08, 0x08, 0x00, 0x08, 0x00, 0x00], // '?'
    [0x00, 0x00, 0x1c, 0x22, 0x22, 0x26, 0x2a, 0x2a, 0x2c, 0x20, 0x1e, 0x00, 0x00], // '@'
    [0x00, 0x00, 0x08, 0x14, 0x22, 0x22, 0x22, 0x3e, 0x22, 0x22, 0x22, 0x00, 0x00], // 'A'
    [0x00, 0x00, 0x3c, 0x12, 0x12, 0x12, 0x1c, 0x12, 0x12, 0x12, 0x3c, 0x00, 0x00], // 'B'
    [0x00, 0x00, 0x1c, 0x22, 0x20, 0x20, 0x20, 0x20, 0x20, 0x22, 0x1c, 0x00, 0x00], // 'C'
    [0x00, 0x00, 0x3c, 0x12, 0x12, 0x12, 0x12, 0x12, 0x12, 0x12, 0x3c, 0x00, 0x00], // 'D'
    [0x00, 0x00, 0x3e, 0x20, 0x20, 0x20, 0x3c, 0x20, 0x20, 0x20, 0x3e, 0x00, 0x00], // 'E'
    [0x00, 0x00, 0x3e, 0x20, 0x20, 0x20, 0x3c, 0x20, 0x20, 0x20, 0x20, 0x00, 0x00], // 'F'
    [0x00, 0x00, 0x1c, 0x22, 0x20, 0x20, 0x20, 0x26, 0x22, 0x22, 0x1c, 0x00, 0x00], // 'G'
    [0x00, 0x00, 0x22, 0x22, 0x22, 0x22, 0x3e, 0x22, 0x22, 0x22, 0x22, 0x00, 0x00], // 'H'
    [0x00, 0x00, 0x1c, 0x08, 0x08, 0x08, 0x08, 0x08, 0x08, 0x08, 0x1c, 0x00, 0x00], // 'I'
    [0x00, 0x00, 0x0e, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x24, 0x18, 0x00, 0x00], // 'J'
    [0x00, 0x00, 0x22, 0x22, 0x24, 0x28, 0x30, 0x28, 0x24, 0x22, 0x22, 0x00, 0x00], // 'K'
    [0x00, 0x00, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x3e, 0x00, 0x00], // 'L'
    [0x00, 0x00, 0x22, 0x22, 0x36, 0x2a, 0x2a, 0x22, 0x22, 0x22, 0x22, 0x00, 0x00], // 'M'
    [0x00, 0x00, 0x22, 0x32, 0x32, 0x2a, 0x2a, 0x26, 0x26, 0x22, 0x22, 0x00, 0x00], // 'N'
    [0x00, 0x00, 0x1c, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x1c, 0x00, 0x00], // 'O'
    [0x00, 0x00, 0x3c, 0x22, 0x22, 0x22, 0x3c, 0x20, 0x20, 0x20, 0x20, 0x00, 0x00], // 'P'
    [0x00, 0x00, 0x1c, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x2a, 0x1c, 0x02, 0x00], // 'Q'
    [0x00, 0x00, 0x3c, 0x22, 0x22, 0x22, 0x3c, 0x28, 0x24, 0x22, 0x22, 0x00, 0x00], // 'R'
    [0x00, 0x00, 0x1c, 0x22, 0x20, 0x20, 0x1c, 0x02, 0x02, 0x22, 0x1c, 0x00, 0x00], // 'S'
    [0x00, 0x00, 0x3e, 0x08, 0x08, 0x08, 0x08, 0x08, 0x08, 0x08, 0x08, 0x00, 0x00], // 'T'
    [0x00, 0x00, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x1c, 0x00, 0x00], // 'U'
    [0x00, 0x00, 0x22, 0x22, 0x22, 0x22, 0x14, 0x14, 0x14, 0x08, 0x08, 0x00, 0x00], // 'V'
    [0x00, 0x00, 0x22, 0x22, 0x22, 0x22, 0x2a, 0x2a, 0x2a, 0x2a, 0x14, 0x00, 0x00], // 'W'
    [0x00, 0x00, 0x22, 0x22, 0x14, 0x14, 0x08, 0x14, 0x14, 0x22, 0x22, 0x00, 0x00], // 'X'
    [0x00, 0x00, 0x22, 0x22, 0x14, 0x14, 0x08, 0x08, 0x08, 0x08, 0x08, 0x00, 0x00], // 'Y'
    [0x00, 0x00, 0x3e, 0x02, 0x04, 0x04, 0x08, 0x10, 0x10, 0x20, 0x3e, 0x00, 0x00], // 'Z'
    [0x00, 0x1c, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1c, 0x00], // '['
    [0x00, 0x00, 0x20, 0x20, 0x10, 0x10, 0x08, 0x04, 0x04, 0x02, 0x02, 0x00, 0x00], // '\\'
    [0x00, 0x1c, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x1c, 0x00], // ']'
    [0x00, 0x00, 0x08, 0x14, 0x22, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // '^'
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x3e, 0x00], // '_'
    [0x00, 0x08, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // '`'
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x1c, 0x02, 0x1e, 0x22, 0x26, 0x1a, 0x00, 0x00], // 'a'
    [0x00, 0x00, 0x20, 0x20, 0x20, 0x3c, 0x22, 0x22, 0x22, 0x22, 0x3c, 0x00, 0x00], // 'b'
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x1c, 0x22, 0x20, 0x20, 0x22, 0x1c, 0x00, 0x00], // 'c'
    [0x00, 0x00, 0x02, 0x02, 0x02, 0x1e, 0x22, 0x22, 0x22, 0x22, 0x1e, 0x00, 0x00], // 'd'
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x1c, 0x22, 0x3e, 0x20, 0x22, 0x1c, 0x00, 0x00], // 'e'
    [0x00, 0x00, 0x0c, 0x12, 0x10, 0x10, 0x3c, 0x10, 0x10, 0x10, 0x10, 0x00, 0x00], // 'f'
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x1c, 0x22, 0x22, 0x22, 0x1e, 0x02, 0x22, 0x1c], // 'g'
    [0x00, 0x00, 0x20, 0x20, 0x20, 0x2c, 0x32, 0x22, 0x22, 0x22, 0x22, 0x00, 0x00], // 'h'
    [0x00, 0x00, 0x00, 0x08, 0x00, 0x18, 0x08, 0x08, 0x08, 0x08, 0x1c, 0x00, 0x00], // 'i'
    [0x00, 0x00, 0x00, 0x04, 0x00, 0x0c, 0x04, 0x04, 0x04, 0x04, 0x24, 0x24, 0x18], // 'j'
    [0x00, 0x00, 0x20, 0x20, 0x20, 0x24, 0x28, 0x30, 0x28, 0x24, 0x22, 0x00, 0x00], // 'k'
    [0x00, 0x00, 0x18, 0x08, 0x08, 0x08, 0x08, 0x08, 0x08, 0x08, 0x1c, 0x00, 0x00], // 'l'
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x34, 0x2a, 0x2a, 0x2a, 0x2a, 0x22, 0x00, 0x00], // 'm'
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x32, 0x22, 0x22, 0x22, 0x22, 0x00, 0x00], // 'n'
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x1c, 0x22, 0x22, 0x22, 0x22, 0x1c, 0x00, 0x00], // 'o'
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x3c, 0x22, 0x22, 0x22, 0x3c, 0x20, 0x20, 0x20], // 'p'
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x1e, 0x22, 0x22, 0x22, 0x1e, 0x02, 0x02, 0x02], // 'q'
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x32, 0x20, 0x20, 0x20, 0x20, 0x00, 0x00], // 'r'
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x1c, 0x22, 0x18, 0x04, 0x22, 0x1c, 0x00, 0x00], // 's'
    [0x00, 0x00, 0x00, 0x10, 0x10, 0x3c, 0x10, 0x10, 0x10, 0x12, 0x0c, 0x00, 0x00], // 't'
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x22, 0x22, 0x22, 0x22, 0x26, 0x1a, 0x00, 0x00], // 'u'
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x22, 0x22, 0x22, 0x14, 0x14, 0x08, 0x00, 0x00], // 'v'
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x22, 0x22, 0x2a, 0x2a, 0x2a, 0x14, 0x00, 0x00], // 'w'
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x22, 0x14, 0x08, 0x08, 0x14, 0x22, 0x00, 0x00], // 'x'
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x22, 0x22, 0x22, 0x26, 0x1a, 0x02, 0x22, 0x1c], // 'y'
    [0x00, 0x00, 0x00, 0x00, 0x00, 0x3e, 0x04, 0x08, 0x10, 0x20, 0x3e, 0x00, 0x00], // 'z'
    [0x00, 0x06, 0x08, 0x08, 0x08, 0x08, 0x30, 0x08, 0x08, 0x08, 0x08, 0x06, 0x00], // '{'
    [0x00, 0x00, 0x08, 0x08, 0x08, 0x08, 0x08, 0x08, 0x08, 0x08, 0x08, 0x00, 0x00], // '|'
    [0x00, 0x30, 0x08, 0x08, 0x08, 0x08, 0x06, 0x08, 0x08, 0x08, 0x08, 0x30, 0x00], // '}'
    [0x00, 0x00, 0x12, 0x2a, 0x24, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // '~'
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_labels_fit_the_step() {
        let a = Axis::fit([0.0, 8e-3].into_iter(), 0.0).unwrap();
        assert_eq!(a.step, 1e-3);
        let labels: Vec<String> = a.ticks.iter().map(|&t| a.label(t)).collect();
        assert_eq!(labels[..3], ["0.000", "0.001", "0.002"]);
        assert_eq!(labels.len(), 9);
        let a = Axis::fit([0.0, 100.0].into_iter(), 0.05).unwrap();
        assert_eq!(a.ticks, [0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        let a = Axis::fit([0.0, 4e-5].into_iter(), 0.0).unwrap();
        assert_eq!(a.label(a.ticks[1]), "5e-6");
        let a = Axis::fit([0.0, 1000.0].into_iter(), 0.0).unwrap();
        assert_eq!(a.label(600.0), "600");
        let a = Axis::fit([0.0, 3.0].into_iter(), 0.02).unwrap().whole();
        assert_eq!(a.ticks, [0.0, 1.0, 2.0, 3.0]);
        assert_eq!(a.label(2.0), "2");
        // A constant series still gets a range.
        let a = Axis::fit([3.0, 3.0, f64::NAN].into_iter(), 0.05).unwrap();
        assert!(a.min < 3.0 && a.max > 3.0);
        assert!(Axis::fit([f64::NAN].into_iter(), 0.05).is_none());
    }

    #[test]
    fn parses_python_nan_missing_fields_and_skips_garbage() {
        let m = parse_metrics(
            "{\"epoch\": 0, \"step\": 1, \"loss\": NaN, \"lr\": 0.001}\n\
             {\"epoch\": 0, \"loss\": 2.5}\n\
             not json\n\
             [1, 2]\n\
             \n\
             {\"epoch\": 0, \"step\": 2, \"top1\": 10.5, \"top5\": null, \"val_loss\": 2.0}\n\
             {\"epoch\": 1}\n",
        );
        assert_eq!(m.num_bad_lines, 2);
        assert_eq!(m.train.len(), 2);
        assert!(m.train[0].loss.is_nan());
        assert_eq!(m.train[0].lr, 0.001);
        assert_eq!(
            m.train[1].step, 1.0,
            "no step: position among training lines"
        );
        assert!(m.train[1].lr.is_nan());
        assert_eq!(m.eval.len(), 1);
        assert_eq!(m.eval[0].top1, 10.5);
        assert!(m.eval[0].top5.is_nan());
    }

    #[test]
    fn empty_metrics_give_three_empty_panels() {
        let img = render_metrics(&Metrics::default());
        assert_eq!(img.dimensions(), (WIDTH_PX, HEIGHT_PX));
        for panel in 0..3 {
            let r = plot_area(panel);
            assert!(!has_colour(&img, r, BLUE));
        }
    }

    fn has_colour(img: &RgbImage, r: Rect, c: Rgb<u8>) -> bool {
        (r.y..r.y + r.h).any(|y| (r.x..r.x + r.w).any(|x| *img.get_pixel(x as u32, y as u32) == c))
    }

    fn count_colour(img: &RgbImage, r: Rect, c: Rgb<u8>) -> usize {
        (r.y..r.y + r.h)
            .flat_map(|y| (r.x..r.x + r.w).map(move |x| (x, y)))
            .filter(|&(x, y)| *img.get_pixel(x as u32, y as u32) == c)
            .count()
    }

    #[test]
    fn plot_metrics_writes_a_png_with_curves_in_every_panel() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("metrics.jsonl");
        let mut text = String::new();
        let steps_per_epoch = 50;
        for epoch in 0..6 {
            for s in 0..steps_per_epoch {
                let step = epoch * steps_per_epoch + s;
                let lr = 5e-3 * (step as f64 / 300.0 * std::f64::consts::PI).cos().max(0.0);
                let loss = if step == 77 {
                    "NaN".to_owned()
                } else {
                    format!("{}", 2.3 * (-(step as f64) / 200.0).exp() + 0.2)
                };
                text += &format!(
                    "{{\"epoch\": {epoch}, \"step\": {step}, \"loss\": {loss}, \"lr\": {lr}}}\n"
                );
            }
            let step = (epoch + 1) * steps_per_epoch;
            let top1 = 10.0 + 12.0 * epoch as f64;
            text += &format!(
                "{{\"epoch\": {epoch}, \"step\": {step}, \"top1\": {top1}, \"top5\": {}, \"val_loss\": {}}}\n",
                top1 + 20.0,
                2.0 - 0.2 * epoch as f64
            );
        }
        std::fs::write(&jsonl, text).unwrap();
        let png = dir.path().join("plot.png");
        let m = plot_metrics(&jsonl, &png).unwrap();
        assert_eq!((m.train.len(), m.eval.len(), m.num_bad_lines), (300, 6, 0));

        let bytes = std::fs::read(&png).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
        let img = image::load_from_memory(&bytes).unwrap().into_rgb8();
        assert_eq!(img.dimensions(), (WIDTH_PX, HEIGHT_PX));
        // Loss: raw light blue, moving average blue, val orange; lr blue; top-1 blue, top-5 orange.
        let (p0, p1, p2) = (plot_area(0), plot_area(1), plot_area(2));
        assert!(count_colour(&img, p0, LIGHT_BLUE) > 100);
        assert!(count_colour(&img, p0, BLUE) > 300);
        assert!(count_colour(&img, p0, ORANGE) > 30);
        assert!(count_colour(&img, p1, BLUE) > 300);
        assert!(count_colour(&img, p2, BLUE) > 200);
        assert!(count_colour(&img, p2, ORANGE) > 200);
        // Tick labels and titles: dark text outside the plotting areas.
        let text_px = img
            .enumerate_pixels()
            .filter(|(x, y, p)| {
                **p == TEXT
                    && (0..3).all(|i| {
                        let r = plot_area(i);
                        !((r.x..r.x + r.w).contains(&(*x as i64))
                            && (r.y..r.y + r.h).contains(&(*y as i64)))
                    })
            })
            .count();
        assert!(text_px > 1000, "{text_px}");
    }
}
