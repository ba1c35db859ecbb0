//! Training curves: three panels side by side, training loss against step (with `val_loss`),
//! learning rate against step, and top-1/top-5 against epoch, for one run or several overlaid.
//!
//! One run keeps the colours `plot-metrics` always had: raw loss in light blue under a blue
//! moving average (once there are over [`SMOOTH_ABOVE`] training lines), validation loss in
//! orange, top-1 blue and top-5 orange. Several runs get one colour each (legend: the run
//! labels); within a run, training loss and top-1 are solid, validation loss and top-5 dashed,
//! and grey legend entries say so. Overlays leave out the raw loss under the moving average,
//! which would hide the other runs.

use std::path::Path;

use anyhow::{bail, Result};
use image::RgbImage;
use plotters::prelude::*;

use super::{
    build_chart, draw_curve, draw_key, draw_legend, draw_mesh, draw_no_data, palette, read_metrics,
    render, run_label, save_png, tint, value_range, Area, Line, Metrics, KEY_GREY, MAX_TICKS,
};

/// Width of the PNG in pixels.
pub const WIDTH_PX: u32 = 1500;
/// Height of the PNG in pixels.
pub const HEIGHT_PX: u32 = 480;

/// Above this many training lines the loss is drawn as a moving average over 2% of them.
pub const SMOOTH_ABOVE: usize = 100;
/// Up to this many evaluations each gets a dot.
const MARKERS_UP_TO: usize = 30;

/// Reads `metrics_jsonl_path` and writes the three-panel plot to `out_png_path`
/// ([`WIDTH_PX`] x [`HEIGHT_PX`]). Returns what was read.
pub fn plot_metrics(metrics_jsonl_path: &Path, out_png_path: &Path) -> Result<Metrics> {
    let m = read_metrics(metrics_jsonl_path)?;
    let runs = [(run_label(metrics_jsonl_path), m)];
    plot_runs(&runs, out_png_path)?;
    let [(_, m)] = runs;
    Ok(m)
}

/// Writes the three-panel plot of `runs` (label, metrics), overlaid, to `out_png_path`
/// ([`WIDTH_PX`] x [`HEIGHT_PX`]). One run gives the same plot as [`plot_metrics`].
pub fn plot_runs(runs: &[(String, Metrics)], out_png_path: &Path) -> Result<()> {
    save_png(&render_runs(runs)?, out_png_path)
}

/// Draws the three panels of one run.
pub fn render_metrics(m: &Metrics) -> Result<RgbImage> {
    render_runs(&[(String::new(), m.clone())])
}

/// Draws the three panels of `runs` (label, metrics) overlaid; fails if `runs` is empty.
pub fn render_runs(runs: &[(String, Metrics)]) -> Result<RgbImage> {
    if runs.is_empty() {
        bail!("no runs to plot");
    }
    let curves: Vec<RunCurves> = runs.iter().map(|(_, m)| RunCurves::of(m)).collect();
    let labels: Vec<&str> = runs.iter().map(|(l, _)| l.as_str()).collect();
    render(WIDTH_PX, HEIGHT_PX, |root| {
        let panels = root.split_evenly((1, 3));
        loss_panel(&panels[0], &labels, &curves)?;
        lr_panel(&panels[1], &labels, &curves)?;
        accuracy_panel(&panels[2], &labels, &curves)
    })
}

type Curve = Vec<(f64, f64)>;

/// A run's curves, as (x, y) with NaN for gaps.
#[derive(Clone, Debug, PartialEq)]
struct RunCurves {
    /// (step, loss).
    loss: Curve,
    /// The moving average of `loss`, if it has over [`SMOOTH_ABOVE`] points.
    loss_avg: Option<Curve>,
    /// (step, val_loss) of the evaluations that have a step.
    val_loss: Curve,
    /// (step, lr).
    lr: Curve,
    /// (epoch, top1) and (epoch, top5).
    top1: Curve,
    top5: Curve,
}

impl RunCurves {
    fn of(m: &Metrics) -> Self {
        let loss: Curve = m.train.iter().map(|p| (p.step, p.loss)).collect();
        let loss_avg = (loss.len() > SMOOTH_ABOVE).then(|| {
            let ys: Vec<f64> = loss.iter().map(|p| p.1).collect();
            let avg = moving_average(&ys, loss.len() / 50);
            loss.iter().zip(avg).map(|(p, a)| (p.0, a)).collect()
        });
        RunCurves {
            loss,
            loss_avg,
            val_loss: m
                .eval
                .iter()
                .map(|p| (p.step, p.val_loss))
                .filter(|p| p.0.is_finite())
                .collect(),
            lr: m.train.iter().map(|p| (p.step, p.lr)).collect(),
            top1: m.eval.iter().map(|p| (p.epoch, p.top1)).collect(),
            top5: m.eval.iter().map(|p| (p.epoch, p.top5)).collect(),
        }
    }

    /// The training-loss curve drawn in colour: the moving average if there is one.
    fn train_loss(&self) -> &Curve {
        self.loss_avg.as_ref().unwrap_or(&self.loss)
    }
}

/// A trailing moving average over `window` finite values (NaN where the input is NaN).
fn moving_average(values: &[f64], window: usize) -> Vec<f64> {
    let window = window.max(1);
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

/// The x and y ranges of the finite points of `curves`, padded; `None` if there is none.
fn ranges<'a>(curves: impl Iterator<Item = &'a Curve> + Clone) -> Option<((f64, f64), (f64, f64))> {
    let finite = move || {
        curves
            .clone()
            .flatten()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
    };
    Some((
        value_range(finite().map(|p| p.0), 0.02)?,
        value_range(finite().map(|p| p.1), 0.05)?,
    ))
}

const NO_DATA: &str = "no data";

fn loss_panel(area: &Area<'_>, labels: &[&str], runs: &[RunCurves]) -> Result<()> {
    let title = "training loss";
    let Some((x, y)) = ranges(runs.iter().flat_map(|r| [&r.loss, &r.val_loss])) else {
        return draw_no_data(area, title, NO_DATA);
    };
    let mut chart = build_chart(area, title, x, y)?;
    draw_mesh(&mut chart, "step", "loss", MAX_TICKS)?;
    let smoothed = runs.iter().any(|r| r.loss_avg.is_some());
    let train_name = if smoothed {
        "train (moving avg)"
    } else {
        "train"
    };
    let has_val = |r: &RunCurves| r.val_loss.iter().any(|p| p.1.is_finite());
    if let [r] = runs {
        let (blue, orange) = (palette(0), palette(1));
        if r.loss_avg.is_some() {
            let raw = Line {
                width: 1,
                ..Line::solid(tint(blue, 0.6))
            };
            draw_curve(&mut chart, &r.loss, raw, None)?;
        }
        draw_curve(
            &mut chart,
            r.train_loss(),
            Line::solid(blue),
            Some(train_name),
        )?;
        if has_val(r) {
            let val = Line::solid(orange).markers(r.val_loss.len() <= MARKERS_UP_TO);
            draw_curve(&mut chart, &r.val_loss, val, Some("val"))?;
        }
    } else {
        for (i, (r, label)) in runs.iter().zip(labels).enumerate() {
            let line = Line::solid(palette(i));
            draw_curve(&mut chart, r.train_loss(), line, Some(label))?;
            let val = line.dashed().markers(r.val_loss.len() <= MARKERS_UP_TO);
            draw_curve(&mut chart, &r.val_loss, val, None)?;
        }
        draw_key(&mut chart, Line::solid(KEY_GREY), train_name)?;
        if runs.iter().any(has_val) {
            draw_key(&mut chart, Line::solid(KEY_GREY).dashed(), "val")?;
        }
    }
    draw_legend(&mut chart, SeriesLabelPosition::UpperRight)
}

fn lr_panel(area: &Area<'_>, labels: &[&str], runs: &[RunCurves]) -> Result<()> {
    let title = "learning rate";
    let Some((x, mut y)) = ranges(runs.iter().map(|r| &r.lr)) else {
        return draw_no_data(area, title, NO_DATA);
    };
    // Learning rates start (warm-up) and end (cosine) near 0: show 0 when it is close.
    if y.0 > 0.0 && y.0 < (y.1 - y.0) * 0.5 {
        let finite = runs.iter().flat_map(|r| &r.lr).map(|p| p.1);
        y = value_range(finite.chain([0.0]), 0.05).expect("finite values");
    }
    let mut chart = build_chart(area, title, x, y)?;
    draw_mesh(&mut chart, "step", "lr", MAX_TICKS)?;
    if let [r] = runs {
        draw_curve(&mut chart, &r.lr, Line::solid(palette(0)), None)
    } else {
        for (i, (r, label)) in runs.iter().zip(labels).enumerate() {
            draw_curve(&mut chart, &r.lr, Line::solid(palette(i)), Some(label))?;
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperRight)
    }
}

fn accuracy_panel(area: &Area<'_>, labels: &[&str], runs: &[RunCurves]) -> Result<()> {
    let title = "top-1 / top-5 accuracy";
    let Some((x, y)) = ranges(runs.iter().flat_map(|r| [&r.top1, &r.top5])) else {
        return draw_no_data(area, title, NO_DATA);
    };
    let mut chart = build_chart(area, title, x, y)?;
    draw_mesh(&mut chart, "epoch", "accuracy", MAX_TICKS)?;
    let markers = |r: &RunCurves| r.top1.len() <= MARKERS_UP_TO;
    if let [r] = runs {
        let (blue, orange) = (palette(0), palette(1));
        draw_curve(
            &mut chart,
            &r.top5,
            Line::solid(orange).markers(markers(r)),
            None,
        )?;
        draw_curve(
            &mut chart,
            &r.top1,
            Line::solid(blue).markers(markers(r)),
            Some("top-1"),
        )?;
        // The legend lists series in drawing order; top-5 is drawn first so top-1 lies on top.
        draw_key(&mut chart, Line::solid(orange).markers(markers(r)), "top-5")?;
    } else {
        for (i, (r, label)) in runs.iter().zip(labels).enumerate() {
            let line = Line::solid(palette(i)).markers(markers(r));
            draw_curve(&mut chart, &r.top1, line, Some(label))?;
            draw_curve(&mut chart, &r.top5, line.dashed(), None)?;
        }
        draw_key(&mut chart, Line::solid(KEY_GREY), "top-1")?;
        draw_key(&mut chart, Line::solid(KEY_GREY).dashed(), "top-5")?;
    }
    // Accuracy rises, so the bottom right is free.
    draw_legend(&mut chart, SeriesLabelPosition::LowerRight)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{count_colour, count_ink};
    use super::super::{parse_metrics, run_colour};
    use super::*;

    /// A run like the trainer writes: `epochs` x 50 steps of cosine lr and decaying loss (one
    /// NaN), an evaluation per epoch; `shift` moves the curves so overlaid runs differ.
    pub(crate) fn synthetic_metrics(epochs: usize, shift: f64) -> String {
        let mut text = String::new();
        let steps_per_epoch = 50;
        let total = (epochs * steps_per_epoch) as f64;
        for epoch in 0..epochs {
            for s in 0..steps_per_epoch {
                let step = epoch * steps_per_epoch + s;
                let lr = (5e-3 + shift * 1e-3)
                    * (step as f64 / total * std::f64::consts::FRAC_PI_2).cos();
                let loss = if step == 77 {
                    "NaN".to_owned()
                } else {
                    format!("{}", 2.3 * (-(step as f64) / 200.0).exp() + 0.2 + shift)
                };
                text += &format!(
                    "{{\"epoch\": {epoch}, \"step\": {step}, \"loss\": {loss}, \"lr\": {lr}}}\n"
                );
            }
            let step = (epoch + 1) * steps_per_epoch;
            let top1 = 10.0 + 12.0 * epoch as f64 - 5.0 * shift;
            text += &format!(
                "{{\"epoch\": {epoch}, \"step\": {step}, \"top1\": {top1}, \"top5\": {}, \"val_loss\": {}}}\n",
                top1 + 20.0,
                2.0 - 0.2 * epoch as f64 + shift
            );
        }
        text
    }

    const PANEL: u32 = WIDTH_PX / 3;

    #[test]
    fn moving_average_skips_gaps() {
        let n = f64::NAN;
        let avg = moving_average(&[1.0, 3.0, n, 5.0, 7.0], 2);
        assert_eq!(avg[..2], [1.0, 2.0]);
        assert!(avg[2].is_nan());
        assert_eq!(avg[3..], [4.0, 6.0]);
        assert_eq!(moving_average(&[2.0, 4.0], 0), [2.0, 4.0]);
    }

    #[test]
    fn curves_follow_the_metrics() {
        let m = parse_metrics(&synthetic_metrics(6, 0.0));
        let c = RunCurves::of(&m);
        assert_eq!(c.loss.len(), 300);
        let avg = c.loss_avg.as_ref().expect("300 points are smoothed");
        assert!(avg[77].1.is_nan() && avg[78].1.is_finite());
        assert_eq!((c.val_loss.len(), c.top1.len()), (6, 6));
        assert_eq!(c.val_loss[0], (50.0, 2.0));
        let few = RunCurves::of(&parse_metrics(&synthetic_metrics(1, 0.0)));
        assert!(few.loss_avg.is_none());
        assert_eq!(few.train_loss(), &few.loss);
    }

    #[test]
    fn one_run_draws_every_panel_in_the_old_colours() {
        let m = parse_metrics(&synthetic_metrics(6, 0.0));
        let img = render_metrics(&m).unwrap();
        assert_eq!(img.dimensions(), (WIDTH_PX, HEIGHT_PX));
        let (blue, orange, light) = (run_colour(0), run_colour(1), tint(palette(0), 0.6));
        let light = [light.0, light.1, light.2];
        assert!(count_colour(&img, 0, PANEL, light) > 100);
        assert!(count_colour(&img, 0, PANEL, blue) > 300);
        assert!(count_colour(&img, 0, PANEL, orange) > 30);
        assert!(count_colour(&img, PANEL, 2 * PANEL, blue) > 300);
        assert!(count_colour(&img, 2 * PANEL, WIDTH_PX, blue) > 200);
        assert!(count_colour(&img, 2 * PANEL, WIDTH_PX, orange) > 200);
        // Text (ticks, titles, axis names, legend) is drawn in dark grey, anti-aliased.
        let dark = img.pixels().filter(|p| p.0.iter().all(|&v| v < 90)).count();
        assert!(dark > 2000, "{dark}");
    }

    #[test]
    fn empty_metrics_give_three_empty_panels() {
        let img = render_metrics(&Metrics::default()).unwrap();
        assert_eq!(img.dimensions(), (WIDTH_PX, HEIGHT_PX));
        assert_eq!(count_colour(&img, 0, WIDTH_PX, run_colour(0)), 0);
        // Frames, titles and "no data" in each panel.
        for p in 0..3 {
            let ink = img
                .enumerate_pixels()
                .filter(|(x, _, px)| *x / PANEL == p && px.0 != [255, 255, 255])
                .count();
            assert!(ink > 500, "panel {p}: {ink}");
        }
    }

    #[test]
    fn degenerate_series_do_not_panic() {
        let cases = [
            // A single training point, a single evaluation.
            "{\"step\": 0, \"loss\": 2.0, \"lr\": 0.1}\n{\"epoch\": 0, \"top1\": 5.0}\n",
            // Constant values, missing steps and epochs.
            "{\"loss\": 1.0, \"lr\": 0.0}\n{\"loss\": 1.0, \"lr\": 0.0}\n{\"top1\": 3.0, \"top5\": 3.0}\n{\"top1\": 3.0}\n",
            // Everything NaN or null.
            "{\"step\": 0, \"loss\": NaN, \"lr\": null}\n{\"epoch\": 0, \"top1\": NaN, \"val_loss\": Infinity}\n",
        ];
        for text in cases {
            let img = render_metrics(&parse_metrics(text)).unwrap();
            assert!(count_ink(&img) > 1000, "{text}");
        }
        // Lone points still show (as dots).
        let img = render_metrics(&parse_metrics(cases[0])).unwrap();
        assert!(count_colour(&img, 0, PANEL, run_colour(0)) > 10);
        assert!(count_colour(&img, 2 * PANEL, WIDTH_PX, run_colour(0)) > 10);
    }

    #[test]
    fn overlays_draw_each_run_in_its_colour() {
        let runs: Vec<(String, Metrics)> = (0..3)
            .map(|i| {
                let m = parse_metrics(&synthetic_metrics(4, 0.3 * i as f64));
                (format!("A{}", i + 1), m)
            })
            .collect();
        let img = render_runs(&runs).unwrap();
        assert_eq!(img.dimensions(), (WIDTH_PX, HEIGHT_PX));
        for i in 0..3 {
            let c = run_colour(i);
            for p in 0..3 {
                let n = count_colour(&img, p * PANEL, (p + 1) * PANEL, c);
                assert!(n > 150, "run {i}, panel {p}: {n} pixels of {c:?}");
            }
        }
        assert!(render_runs(&[]).is_err());
    }
}
