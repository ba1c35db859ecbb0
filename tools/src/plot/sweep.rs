//! Top-1 against test resolution: one line with dots per centre-crop fraction, and a dashed
//! vertical line at the training resolution (the "train-test resolution discrepancy" plot).

use std::path::Path;

use anyhow::Result;
use image::RgbImage;
use plotters::element::DashedPathElement;
use plotters::prelude::*;

use super::{
    build_chart, draw_curve, draw_legend, draw_mesh, draw_no_data, drawing, palette, render,
    save_png, text_style, value_range, Line, FIGURE_HEIGHT_PX, FIGURE_WIDTH_PX, KEY_GREY,
    MAX_TICKS,
};

/// One evaluation of a resolution sweep.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SweepPoint {
    /// Test image size in pixels (the x axis).
    pub size: u32,
    /// Centre-crop fraction (one line per value).
    pub crop_pct: f64,
    /// Top-1 accuracy (NaN leaves a gap).
    pub top1: f64,
}

/// Writes the resolution-sweep plot ([`FIGURE_WIDTH_PX`] x [`FIGURE_HEIGHT_PX`]) to `out`: top-1
/// against test size, one line per `crop_pct` (legend "crop 0.875"), and a marked vertical line
/// at `train_size` when given. No finite top-1 gives an empty panel that says so.
pub fn plot_resolution_sweep(
    points: &[SweepPoint],
    train_size: Option<u32>,
    title: &str,
    out: &Path,
) -> Result<()> {
    save_png(&render_resolution_sweep(points, train_size, title)?, out)
}

/// Draws the resolution-sweep plot (see [`plot_resolution_sweep`]).
pub fn render_resolution_sweep(
    points: &[SweepPoint],
    train_size: Option<u32>,
    title: &str,
) -> Result<RgbImage> {
    let lines = sweep_lines(points);
    render(FIGURE_WIDTH_PX, FIGURE_HEIGHT_PX, |root| {
        let finite = || {
            lines
                .iter()
                .flat_map(|(_, l)| l)
                .filter(|p| p.1.is_finite())
        };
        let xs = finite().map(|p| p.0).chain(train_size.map(f64::from));
        let (Some(x), Some(y)) = (
            value_range(xs, 0.05),
            value_range(finite().map(|p| p.1), 0.1),
        ) else {
            return draw_no_data(root, title, "no finite top-1 to plot");
        };
        let mut chart = build_chart(root, title, x, y)?;
        draw_mesh(&mut chart, "test size (px)", "top-1 (%)", MAX_TICKS)?;
        if let Some(size) = train_size {
            let at = f64::from(size);
            let style = ShapeStyle::from(&KEY_GREY).stroke_width(2);
            chart
                .draw_series(std::iter::once(DashedPathElement::new(
                    vec![(at, y.0), (at, y.1)],
                    8,
                    6,
                    style,
                )))
                .map_err(drawing)?;
            // The label sits just right of the line, near the bottom: at the training size
            // the curves are near their peak, so the space below them is free.
            let label = EmptyElement::at((at, y.0 + (y.1 - y.0) * 0.03))
                + Text::new(format!("train {size} px"), (6, -18), text_style(14));
            chart.draw_series(std::iter::once(label)).map_err(drawing)?;
        }
        for (i, (crop, pts)) in lines.iter().enumerate() {
            let line = Line::solid(palette(i)).markers(true);
            draw_curve(&mut chart, pts, line, Some(&crop_label(*crop)))?;
        }
        // Small test sizes score lowest, so the top left is free.
        draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)
    })
}

/// The sweep's lines: one per distinct `crop_pct` (ascending), its (size, top1) points sorted by
/// size. Points with a non-finite `crop_pct` are dropped.
fn sweep_lines(points: &[SweepPoint]) -> Vec<(f64, Vec<(f64, f64)>)> {
    let mut crops: Vec<f64> = points
        .iter()
        .map(|p| p.crop_pct)
        .filter(|c| c.is_finite())
        .collect();
    crops.sort_by(f64::total_cmp);
    crops.dedup();
    crops
        .into_iter()
        .map(|crop| {
            let mut pts: Vec<(f64, f64)> = points
                .iter()
                .filter(|p| p.crop_pct == crop)
                .map(|p| (f64::from(p.size), p.top1))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            (crop, pts)
        })
        .collect()
}

/// "crop 0.875", "crop 1.0", "crop 0.95": up to three decimals, at least one.
fn crop_label(crop: f64) -> String {
    let s = format!("{crop:.3}");
    let s = s.trim_end_matches('0');
    let s = if s.ends_with('.') {
        format!("{s}0")
    } else {
        s.to_owned()
    };
    format!("crop {s}")
}

#[cfg(test)]
mod tests {
    use super::super::run_colour;
    use super::super::tests::{count_colour, count_ink};
    use super::*;

    fn sweep() -> Vec<SweepPoint> {
        let mut v = Vec::new();
        for (k, crop) in [1.0, 0.875, 0.95].into_iter().enumerate() {
            for size in [160, 192, 224, 256, 288] {
                let d = (size as f64 - 240.0) / 40.0;
                v.push(SweepPoint {
                    size,
                    crop_pct: crop,
                    top1: 78.0 - d * d - k as f64,
                });
            }
        }
        v
    }

    #[test]
    fn lines_group_by_crop_and_sort_by_size() {
        let mut pts = sweep();
        pts.reverse();
        let lines = sweep_lines(&pts);
        let crops: Vec<f64> = lines.iter().map(|l| l.0).collect();
        assert_eq!(crops, [0.875, 0.95, 1.0]);
        let sizes: Vec<f64> = lines[0].1.iter().map(|p| p.0).collect();
        assert_eq!(sizes, [160.0, 192.0, 224.0, 256.0, 288.0]);
        assert_eq!(crop_label(0.875), "crop 0.875");
        assert_eq!(crop_label(0.95), "crop 0.95");
        assert_eq!(crop_label(1.0), "crop 1.0");
    }

    #[test]
    fn sweep_draws_a_line_per_crop() {
        let img = render_resolution_sweep(&sweep(), Some(224), "ResNet-50 A3").unwrap();
        assert_eq!(img.dimensions(), (FIGURE_WIDTH_PX, FIGURE_HEIGHT_PX));
        for i in 0..3 {
            let n = count_colour(&img, 0, FIGURE_WIDTH_PX, run_colour(i));
            assert!(n > 300, "crop line {i}: {n}");
        }
        let grey = [KEY_GREY.0, KEY_GREY.1, KEY_GREY.2];
        assert!(
            count_colour(&img, 0, FIGURE_WIDTH_PX, grey) > 100,
            "train-size marker"
        );
    }

    #[test]
    fn degenerate_sweeps_do_not_panic() {
        let one = [SweepPoint {
            size: 224,
            crop_pct: 0.95,
            top1: 80.0,
        }];
        let nan = [SweepPoint {
            top1: f64::NAN,
            ..one[0]
        }];
        for (pts, train) in [
            (&[][..], None),
            (&[][..], Some(224)),
            (&one[..], None),
            (&one[..], Some(160)),
            (&nan[..], Some(224)),
        ] {
            let img = render_resolution_sweep(pts, train, "t").unwrap();
            assert!(count_ink(&img) > 300);
        }
        let img = render_resolution_sweep(&one, None, "t").unwrap();
        assert!(count_colour(&img, 0, FIGURE_WIDTH_PX, run_colour(0)) > 10);
    }
}
