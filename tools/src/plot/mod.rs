//! Plots as PNGs, drawn with `plotters`: a run's training curves (`plot-metrics`, and `train`'s
//! `plot.png`), several runs overlaid, top-1 against test resolution (`evaluate`), and the
//! spread of top-1 over seeds (`sweep-report`).
//!
//! How they are built: [`metrics`] reads `metrics.jsonl`; [`runs`], [`sweep`] and [`seeds`] each
//! draw one kind of figure into an RGB buffer through plotters' bitmap backend
//! (`BitMapBackend::with_buffer`), and [`save_png`] writes it with the workspace's `image`. The
//! plotters features are only the bitmap backend (without its encoder, which would bring a
//! second `image`), line and point series, and `ab_glyph` text with the embedded font of
//! `font`, so no system font is needed. The pure arithmetic (axis ranges, tick labels, gaps,
//! moving averages, histogram bins, the fitted normal density) lives in small functions beside
//! the drawing and is unit-tested; the drawing is tested by looking for the series' colours.
//!
//! Degenerate data does not panic: an empty, all-NaN or missing series leaves its panel framed
//! with a "no data" note, and a single point or a constant series gets a padded range.

mod font;
pub mod metrics;
pub mod runs;
pub mod seeds;
pub mod sweep;

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use image::RgbImage;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;

pub use metrics::{
    metrics_path, parse_metrics, read_metrics, run_label, EvalPoint, Metrics, TrainPoint,
};
pub use runs::{plot_metrics, plot_runs, render_metrics, render_runs, HEIGHT_PX, WIDTH_PX};
pub use seeds::{plot_seed_histogram, render_seed_histogram};
pub use sweep::{plot_resolution_sweep, render_resolution_sweep, SweepPoint};

/// Width of the single-panel figures (resolution sweep, seed histogram) in pixels.
pub const FIGURE_WIDTH_PX: u32 = 900;
/// Height of the single-panel figures in pixels.
pub const FIGURE_HEIGHT_PX: u32 = 560;

/// Series colours, one per run (matplotlib's "tab10"); a single run uses the first two as
/// before (blue for training and top-1, orange for validation and top-5).
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The colour of the `i`-th run of an overlay (and of the `i`-th line of a sweep), as RGB;
/// colours repeat after ten.
pub fn run_colour(i: usize) -> [u8; 3] {
    let RGBColor(r, g, b) = PALETTE[i % PALETTE.len()];
    [r, g, b]
}

fn palette(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// `c` blended towards white: `amount` 0 keeps it, 1 gives white.
fn tint(c: RGBColor, amount: f64) -> RGBColor {
    let mix = |v: u8| (v as f64 + (255.0 - v as f64) * amount).round() as u8;
    RGBColor(mix(c.0), mix(c.1), mix(c.2))
}

/// Text colour (dark grey) and the grey of style-only legend entries.
const TEXT: RGBColor = RGBColor(40, 40, 40);
const KEY_GREY: RGBColor = RGBColor(90, 90, 90);

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Draws a `width` x `height` white image with `draw`.
fn render(width: u32, height: u32, draw: impl FnOnce(&Area<'_>) -> Result<()>) -> Result<RgbImage> {
    font::register()?;
    let mut buf = vec![255u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(drawing)?;
        draw(&root)?;
        root.present().map_err(drawing)?;
    }
    RgbImage::from_raw(width, height, buf).ok_or_else(|| anyhow!("plot buffer has the wrong size"))
}

/// Writes `img` as a PNG.
pub fn save_png(img: &RgbImage, out_png_path: &Path) -> Result<()> {
    img.save_with_format(out_png_path, image::ImageFormat::Png)
        .with_context(|| format!("writing {}", out_png_path.display()))
}

/// Turns a plotters error into ours.
fn drawing(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing the plot: {e}")
}

fn text_style(size: u32) -> TextStyle<'static> {
    (font::FAMILY, size).into_font().color(&TEXT)
}

/// The range to plot `values` (non-finite ones ignored) over: `pad` of the span is added on both
/// sides; a single value or a constant gets ±10% of its size (±1 around 0). `None` if no value
/// is finite.
fn value_range(values: impl IntoIterator<Item = f64>, pad: f64) -> Option<(f64, f64)> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.into_iter().filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        return None;
    }
    if hi - lo <= f64::EPSILON * hi.abs().max(lo.abs()) {
        let d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return Some((lo - d, hi + d));
    }
    let d = (hi - lo) * pad;
    Some((lo - d, hi + d))
}

/// The tick spacing plotters picks for `span` with at most `max_ticks` labels: 1, 2 or 5 times
/// a power of ten.
fn tick_step(span: f64, max_ticks: usize) -> f64 {
    let raw = span / max_ticks as f64;
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|f| f * mag)
        .find(|s| *s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * mag)
}

/// Most labels on an axis.
const MAX_TICKS: usize = 8;

/// A tick label on an axis spanning `span` with at most `max_ticks` labels: as many decimals as
/// the tick spacing needs, or scientific notation for very small spacings or very large values.
fn tick_label(v: f64, span: f64, max_ticks: usize) -> String {
    let step = tick_step(span, max_ticks);
    let v = if v.abs() < step * 1e-9 { 0.0 } else { v };
    if step < 1e-4 || v.abs() >= 1e6 {
        // 5.0e-4 -> 5e-4
        format!("{v:.1e}").replace(".0e", "e")
    } else {
        let decimals = (-step.log10().floor()).max(0.0) as usize;
        format!("{v:.decimals$}")
    }
}

/// The runs of consecutive finite points, each a polyline; a missing value breaks the curve.
fn segments(pts: &[(f64, f64)]) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut open = false;
    for &(x, y) in pts {
        if x.is_finite() && y.is_finite() {
            if !open {
                out.push(Vec::new());
                open = true;
            }
            out.last_mut().expect("pushed").push((x, y));
        } else {
            open = false;
        }
    }
    out
}

/// How a curve is drawn.
#[derive(Clone, Copy, Debug)]
struct Line {
    colour: RGBColor,
    width: u32,
    dashed: bool,
    /// A dot at every point (a lone point, with no finite neighbour, always gets one).
    markers: bool,
}

impl Line {
    fn solid(colour: RGBColor) -> Self {
        Line {
            colour,
            width: 2,
            dashed: false,
            markers: false,
        }
    }

    fn dashed(self) -> Self {
        Line {
            dashed: true,
            ..self
        }
    }

    fn markers(self, markers: bool) -> Self {
        Line { markers, ..self }
    }

    fn style(&self) -> ShapeStyle {
        ShapeStyle {
            color: self.colour.to_rgba(),
            filled: false,
            stroke_width: self.width,
        }
    }

    /// The legend's sample of this line, `(x, y)` being its left end.
    fn key(self, at: (i32, i32)) -> Key {
        Key { at, line: self }
    }
}

/// A legend's sample of a [`Line`]: 24 pixels of it, with a dot in the middle if it has
/// markers. (Plotters' composed elements carry the backend type and cannot be legend keys of a
/// backend that borrows its buffer, so this draws on the backend itself.)
struct Key {
    at: (i32, i32),
    line: Line,
}

impl<'a> plotters::element::PointCollection<'a, (i32, i32)> for &'a Key {
    type Point = &'a (i32, i32);
    type IntoIter = std::iter::Once<&'a (i32, i32)>;
    fn point_iter(self) -> Self::IntoIter {
        std::iter::once(&self.at)
    }
}

impl<DB: DrawingBackend> plotters::element::Drawable<DB> for Key {
    fn draw<I: Iterator<Item = (i32, i32)>>(
        &self,
        mut pos: I,
        backend: &mut DB,
        _parent_dim: (u32, u32),
    ) -> Result<(), plotters_backend::DrawingErrorKind<DB::ErrorType>> {
        let Some((x, y)) = pos.next() else {
            return Ok(());
        };
        let style = self.line.style();
        let pieces: &[(i32, i32)] = if self.line.dashed {
            &[(0, 5), (9, 15), (19, 24)]
        } else {
            &[(0, 24)]
        };
        for &(a, b) in pieces {
            backend.draw_line((x + a, y), (x + b, y), &style)?;
        }
        if self.line.markers {
            backend.draw_circle((x + 12, y), 3, &style, true)?;
        }
        Ok(())
    }
}

/// Draws `pts` in `chart` as `line`, broken at missing values, with a legend entry if `label`.
fn draw_curve<'a, 'b: 'a>(
    chart: &mut Chart<'a, 'b>,
    pts: &[(f64, f64)],
    line: Line,
    label: Option<&str>,
) -> Result<()> {
    let segs = segments(pts);
    let style = line.style();
    let long = segs.iter().filter(|s| s.len() > 1).cloned();
    let anno = if line.dashed {
        chart
            .draw_series(long.map(|s| DashedPathElement::new(s, 7, 5, style)))
            .map_err(drawing)?
    } else {
        chart
            .draw_series(long.map(|s| PathElement::new(s, style)))
            .map_err(drawing)?
    };
    if let Some(label) = label {
        anno.label(label).legend(move |p| line.key(p));
    }
    let dots = segs
        .iter()
        .filter(|s| line.markers || s.len() == 1)
        .flatten()
        .map(|&p| Circle::new(p, 3, style.filled()));
    chart.draw_series(dots).map_err(drawing)?;
    Ok(())
}

/// A legend entry with no data: explains a line style (e.g. grey dashed = validation).
fn draw_key<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>, line: Line, label: &str) -> Result<()> {
    chart
        .draw_series(std::iter::empty::<PathElement<(f64, f64)>>())
        .map_err(drawing)?
        .label(label)
        .legend(move |p| line.key(p));
    Ok(())
}

/// The axes of a panel: `title` above, `x_desc`/`y_desc` beside, the given ranges.
fn build_chart<'a, 'b>(
    area: &'a Area<'b>,
    title: &str,
    x: (f64, f64),
    y: (f64, f64),
) -> Result<Chart<'a, 'b>> {
    ChartBuilder::on(area)
        .caption(title, text_style(20))
        .margin(12)
        .margin_right(22)
        .x_label_area_size(46)
        .y_label_area_size(70)
        .build_cartesian_2d(x.0..x.1, y.0..y.1)
        .map_err(drawing)
}

/// Grid, ticks and axis titles, with at most `y_ticks` labels on the y axis.
fn draw_mesh(chart: &mut Chart<'_, '_>, x_desc: &str, y_desc: &str, y_ticks: usize) -> Result<()> {
    let (xr, yr) = (chart.x_range(), chart.y_range());
    let (x_span, y_span) = (xr.end - xr.start, yr.end - yr.start);
    let fx = move |v: &f64| tick_label(*v, x_span, MAX_TICKS);
    let fy = move |v: &f64| tick_label(*v, y_span, y_ticks);
    chart
        .configure_mesh()
        .x_labels(MAX_TICKS)
        .y_labels(y_ticks)
        .max_light_lines(4)
        .x_label_formatter(&fx)
        .y_label_formatter(&fy)
        .label_style(text_style(13))
        .axis_desc_style(text_style(14))
        .x_desc(x_desc)
        .y_desc(y_desc)
        .bold_line_style(RGBColor(222, 222, 222))
        .light_line_style(RGBColor(244, 244, 244))
        .axis_style(BLACK)
        .draw()
        .map_err(drawing)
}

/// The legend, boxed, at `pos`.
fn draw_legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>, pos: SeriesLabelPosition) -> Result<()> {
    chart
        .configure_series_labels()
        .position(pos)
        .margin(8)
        .legend_area_size(32)
        .label_font(text_style(13))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .draw()
        .map_err(drawing)
}

/// An empty, framed panel titled `title` with `note` in the middle (for a series with no
/// finite value).
fn draw_no_data(area: &Area<'_>, title: &str, note: &str) -> Result<()> {
    let mut chart = build_chart(area, title, (0.0, 1.0), (0.0, 1.0))?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(0)
        .y_labels(0)
        .axis_style(BLACK)
        .draw()
        .map_err(drawing)?;
    let style = text_style(16).pos(plotters::style::text_anchor::Pos::new(
        plotters::style::text_anchor::HPos::Center,
        plotters::style::text_anchor::VPos::Center,
    ));
    let frame = Rectangle::new([(0.0, 0.0), (1.0, 1.0)], BLACK.stroke_width(1));
    chart.draw_series(std::iter::once(frame)).map_err(drawing)?;
    chart
        .draw_series(std::iter::once(Text::new(
            note.to_owned(),
            (0.5, 0.5),
            style,
        )))
        .map_err(drawing)?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Pixels of `img` in columns `x0..x1` that have exactly colour `c`.
    pub(crate) fn count_colour(img: &RgbImage, x0: u32, x1: u32, c: [u8; 3]) -> usize {
        img.enumerate_pixels()
            .filter(|(x, _, p)| (x0..x1).contains(x) && p.0 == c)
            .count()
    }

    /// Pixels of `img` that are not white.
    pub(crate) fn count_ink(img: &RgbImage) -> usize {
        img.pixels().filter(|p| p.0 != [255, 255, 255]).count()
    }

    #[test]
    fn ranges_pad_and_survive_constant_single_and_missing_values() {
        assert_eq!(value_range([0.0, 10.0], 0.1), Some((-1.0, 11.0)));
        assert_eq!(
            value_range([f64::NAN, 5.0, f64::INFINITY], 0.1),
            Some((4.5, 5.5))
        );
        assert_eq!(value_range([0.0, 0.0], 0.1), Some((-1.0, 1.0)));
        assert_eq!(value_range([f64::NAN], 0.1), None);
        assert_eq!(value_range([], 0.1), None);
    }

    #[test]
    fn tick_labels_have_the_decimals_the_spacing_needs() {
        assert_eq!(tick_step(8e-3, 8), 1e-3);
        assert_eq!(tick_label(2e-3, 8e-3, 8), "0.002");
        assert_eq!(tick_label(0.0, 8e-3, 8), "0.000");
        assert_eq!(tick_step(100.0, 8), 20.0);
        assert_eq!(tick_label(600.0, 1000.0, 8), "600");
        assert_eq!(tick_label(5e-6, 4e-5, 8), "5e-6");
        assert_eq!(tick_label(1.5, 3.0, 8), "1.5");
        assert_eq!(tick_label(80.25, 0.16, 8), "80.25");
        assert_eq!(tick_label(80.25, 0.5, 8), "80.2");
        assert_eq!(tick_label(2e6, 4e6, 8), "2e6");
        // Rounding noise near zero prints as 0.
        assert_eq!(tick_label(1e-17, 1.0, 8), "0.0");
    }

    #[test]
    fn missing_values_split_curves() {
        let n = f64::NAN;
        let segs = segments(&[
            (0.0, 1.0),
            (1.0, 2.0),
            (2.0, n),
            (3.0, 4.0),
            (n, 5.0),
            (5.0, 6.0),
            (6.0, 7.0),
        ]);
        assert_eq!(
            segs,
            [
                vec![(0.0, 1.0), (1.0, 2.0)],
                vec![(3.0, 4.0)],
                vec![(5.0, 6.0), (6.0, 7.0)]
            ]
        );
        assert!(segments(&[(n, n)]).is_empty());
    }

    #[test]
    fn palette_starts_with_the_single_run_colours() {
        assert_eq!(run_colour(0), [31, 119, 180]);
        assert_eq!(run_colour(1), [255, 127, 14]);
        assert_eq!(run_colour(10), run_colour(0));
        assert_eq!(tint(RGBColor(0, 100, 255), 0.5), RGBColor(128, 178, 255));
    }
}
