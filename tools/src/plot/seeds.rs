//! The spread of top-1 over seeds, as in Figure 2 of "ResNet strikes back" (arXiv:2110.00476):
//! a histogram of the values with the normal density of their mean and sample standard
//! deviation drawn over it, scaled to counts (n x bin width x density), and the mean marked.
//!
//! Bins: equal width between the smallest and largest value, as many as the
//! Freedman–Diaconis rule gives (width 2 IQR / n^(1/3)), or ceil(sqrt(n)) when the
//! interquartile range is 0; between 1 and [`MAX_BINS`]. One seed or identical values give one
//! narrow bin and no curve.

use std::path::Path;

use anyhow::Result;
use image::RgbImage;
use plotters::prelude::*;

use super::{
    build_chart, draw_curve, draw_key, draw_legend, draw_mesh, draw_no_data, drawing, palette,
    render, save_png, tint, value_range, Line, FIGURE_HEIGHT_PX, FIGURE_WIDTH_PX, KEY_GREY,
    MAX_TICKS,
};

/// Most bins of a seed histogram.
pub const MAX_BINS: usize = 50;

/// Equal-width bins: bin `i` is `[lo + i w, lo + (i + 1) w)`, the last one closed.
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    /// Left edge of the first bin.
    pub lo: f64,
    /// Width of every bin.
    pub bin_width: f64,
    /// Values per bin.
    pub counts: Vec<usize>,
}

impl Histogram {
    /// Bins the finite `values` (see the module docs); `None` if none is finite.
    pub fn of(values: &[f64]) -> Option<Histogram> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        let (&lo, &hi) = (v.first()?, v.last()?);
        if hi - lo <= f64::EPSILON * hi.abs().max(lo.abs()) {
            // One value (or several equal ones): one bin, 1% of the value wide (1 around 0).
            let w = if lo == 0.0 { 1.0 } else { lo.abs() * 0.01 };
            return Some(Histogram {
                lo: lo - w / 2.0,
                bin_width: w,
                counts: vec![v.len()],
            });
        }
        let k = num_bins(&v);
        let w = (hi - lo) / k as f64;
        let mut counts = vec![0; k];
        for x in &v {
            counts[(((x - lo) / w) as usize).min(k - 1)] += 1;
        }
        Some(Histogram {
            lo,
            bin_width: w,
            counts,
        })
    }

    /// The `counts.len() + 1` bin edges.
    pub fn edges(&self) -> Vec<f64> {
        (0..=self.counts.len())
            .map(|i| self.lo + i as f64 * self.bin_width)
            .collect()
    }

    /// How many values were binned.
    pub fn num_values(&self) -> usize {
        self.counts.iter().sum()
    }
}

/// The number of bins for `sorted` (ascending, finite, not all equal): Freedman–Diaconis, or
/// ceil(sqrt(n)) when the interquartile range is 0; clamped to 1..=[`MAX_BINS`].
pub fn num_bins(sorted: &[f64]) -> usize {
    let n = sorted.len();
    let (lo, hi) = match (sorted.first(), sorted.last()) {
        (Some(&lo), Some(&hi)) if hi > lo => (lo, hi),
        _ => return 1,
    };
    let iqr = quantile(sorted, 0.75) - quantile(sorted, 0.25);
    let k = if iqr > 0.0 {
        let width = 2.0 * iqr / (n as f64).cbrt();
        ((hi - lo) / width).ceil()
    } else {
        (n as f64).sqrt().ceil()
    };
    (k as usize).clamp(1, MAX_BINS)
}

/// The `q` quantile of `sorted` (non-empty, ascending), interpolating linearly between the
/// order statistics (numpy's default).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (i, frac) = (pos.floor() as usize, pos.fract());
    match sorted.get(i + 1) {
        Some(next) => sorted[i] + frac * (next - sorted[i]),
        None => sorted[i],
    }
}

/// The mean and the sample standard deviation (n - 1 in the denominator) of the finite
/// `values`; the deviation is `None` for a single value, and `None` overall for none.
pub fn mean_and_std(values: &[f64]) -> Option<(f64, Option<f64>)> {
    let v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let std = (v.len() > 1)
        .then(|| (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt());
    Some((mean, std))
}

/// The normal density of (`mean`, `std`) at `x` scaled to a histogram of `n` values in bins
/// `bin_width` wide: the count a bin centred at `x` should hold.
pub fn fitted_count(x: f64, mean: f64, std: f64, n: usize, bin_width: f64) -> f64 {
    let z = (x - mean) / std;
    let pdf = (-0.5 * z * z).exp() / (std * (2.0 * std::f64::consts::PI).sqrt());
    n as f64 * bin_width * pdf
}

/// Decimals for the mean and std labels: two significant digits of the deviation.
fn stat_decimals(std: Option<f64>, mean: f64) -> usize {
    match std.filter(|s| *s > 0.0) {
        Some(s) => (1.0 - s.log10().floor()).clamp(0.0, 8.0) as usize,
        None if mean.abs() < 1.0 => 4,
        None => 2,
    }
}

/// Writes the histogram of `values` (top-1 over seeds) with its fitted normal curve to `out`
/// ([`FIGURE_WIDTH_PX`] x [`FIGURE_HEIGHT_PX`]); the legend gives n, the mean and the sample
/// std. Non-finite values are skipped (and counted in the legend); none finite gives an empty
/// panel that says so.
pub fn plot_seed_histogram(values: &[f64], title: &str, out: &Path) -> Result<()> {
    save_png(&render_seed_histogram(values, title)?, out)
}

/// Draws the seed histogram (see [`plot_seed_histogram`]).
pub fn render_seed_histogram(values: &[f64], title: &str) -> Result<RgbImage> {
    render(FIGURE_WIDTH_PX, FIGURE_HEIGHT_PX, |root| {
        let (Some(h), Some((mean, std))) = (Histogram::of(values), mean_and_std(values)) else {
            return draw_no_data(root, title, "no finite top-1 values");
        };
        let n = h.num_values();
        let skipped = values.len() - n;
        let std = std.filter(|s| *s > 0.0);
        let edges = h.edges();
        let (left, right) = (edges[0], edges[edges.len() - 1]);
        // Room for the fitted curve out to 3.5 std, or beside a lone bin.
        let (x_lo, x_hi) = match std {
            Some(s) => (left.min(mean - 3.5 * s), right.max(mean + 3.5 * s)),
            None => (left - 2.0 * h.bin_width, right + 2.0 * h.bin_width),
        };
        let x = value_range([x_lo, x_hi], 0.05).expect("finite edges");
        let peak = std.map_or(0.0, |s| fitted_count(mean, mean, s, n, h.bin_width));
        let top = h.counts.iter().copied().max().unwrap_or(0) as f64;
        let y = (0.0, top.max(peak) * 1.25);

        let mut chart = build_chart(root, title, x, y)?;
        // Counts are whole: no more y labels than there are whole numbers on the axis.
        draw_mesh(
            &mut chart,
            "top-1",
            "seeds",
            (y.1 as usize + 1).clamp(2, MAX_TICKS),
        )?;
        let (blue, orange) = (palette(0), palette(1));
        let bars = h.counts.iter().enumerate().map(|(i, &c)| {
            Rectangle::new(
                [(edges[i], 0.0), (edges[i + 1], c as f64)],
                tint(blue, 0.45).filled(),
            )
        });
        let mut seeds = format!("{n} seed{}", if n == 1 { "" } else { "s" });
        if skipped > 0 {
            seeds += &format!(" ({skipped} non-finite skipped)");
        }
        chart
            .draw_series(bars)
            .map_err(drawing)?
            .label(seeds)
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 6), (x + 24, y + 6)], tint(blue, 0.45).filled())
            });
        let outlines = h
            .counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(i, &c)| {
                Rectangle::new(
                    [(edges[i], 0.0), (edges[i + 1], c as f64)],
                    blue.stroke_width(1),
                )
            });
        chart.draw_series(outlines).map_err(drawing)?;

        let d = stat_decimals(std, mean);
        let mean_line = Line {
            width: 1,
            ..Line::solid(KEY_GREY).dashed()
        };
        draw_curve(&mut chart, &[(mean, 0.0), (mean, y.1)], mean_line, None)?;
        match std {
            Some(s) => {
                let xs = (0..=400).map(|i| x.0 + (x.1 - x.0) * i as f64 / 400.0);
                let curve: Vec<(f64, f64)> = xs
                    .map(|v| (v, fitted_count(v, mean, s, n, h.bin_width)))
                    .collect();
                let label = format!("normal fit: mean {mean:.d$}, std {s:.d$}");
                draw_curve(&mut chart, &curve, Line::solid(orange), Some(&label))?;
            }
            None if n == 1 => draw_key(
                &mut chart,
                mean_line,
                &format!("mean {mean:.d$} (one seed: no std)"),
            )?,
            None => draw_key(&mut chart, mean_line, &format!("mean {mean:.d$}, std 0"))?,
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperRight)
    })
}

#[cfg(test)]
mod tests {
    use super::super::run_colour;
    use super::super::tests::{count_colour, count_ink};
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs().max(1.0)
    }

    #[test]
    fn quantiles_interpolate_like_numpy() {
        let v: Vec<f64> = (1..=8).map(f64::from).collect();
        // numpy.quantile([1..8], [0.25, 0.5, 0.75]) == [2.75, 4.5, 6.25]
        assert_eq!(quantile(&v, 0.25), 2.75);
        assert_eq!(quantile(&v, 0.5), 4.5);
        assert_eq!(quantile(&v, 0.75), 6.25);
        assert_eq!(quantile(&[3.0], 0.75), 3.0);
    }

    #[test]
    fn bins_follow_freedman_diaconis_or_sqrt_n() {
        // IQR 3.5, n 8: width 2 * 3.5 / 2 = 3.5 over a range of 7 -> 2 bins.
        let v: Vec<f64> = (1..=8).map(f64::from).collect();
        assert_eq!(num_bins(&v), 2);
        let h = Histogram::of(&v).unwrap();
        assert_eq!((h.lo, h.bin_width, &h.counts[..]), (1.0, 3.5, &[4, 4][..]));
        assert_eq!(h.edges(), [1.0, 4.5, 8.0]);
        // IQR 0: ceil(sqrt(8)) = 3 bins 4/3 wide; the maximum falls in the last bin.
        let v = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 5.0];
        let h = Histogram::of(&v).unwrap();
        assert_eq!(h.counts, [7, 0, 1]);
        assert!(close(h.bin_width, 4.0 / 3.0));
        // A far outlier: Freedman–Diaconis asks for ~10^6 bins, capped at MAX_BINS.
        let mut v: Vec<f64> = (0..999).map(|i| i as f64 / 1000.0).collect();
        v.push(1e6);
        assert_eq!(num_bins(&v), MAX_BINS);
        // Order and non-finite values do not matter.
        let h = Histogram::of(&[8.0, f64::NAN, 1.0, 5.0, 4.0, 3.0, 2.0, 7.0, 6.0]).unwrap();
        assert_eq!(h.counts, [4, 4]);
        assert_eq!(h.num_values(), 8);
    }

    #[test]
    fn one_value_or_equal_values_give_one_bin() {
        let h = Histogram::of(&[80.0]).unwrap();
        assert_eq!(h.counts, [1]);
        assert!(close(h.bin_width, 0.8) && close(h.lo, 79.6));
        assert_eq!(Histogram::of(&[0.0, 0.0]).unwrap().counts, [2]);
        assert_eq!(Histogram::of(&[f64::NAN]), None);
        assert_eq!(Histogram::of(&[]), None);
    }

    #[test]
    fn mean_and_sample_std() {
        let (m, s) = mean_and_std(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]).unwrap();
        assert_eq!(m, 5.0);
        assert!(close(s.unwrap(), (32.0f64 / 7.0).sqrt()));
        assert_eq!(mean_and_std(&[3.0, f64::NAN]), Some((3.0, None)));
        assert_eq!(mean_and_std(&[f64::INFINITY]), None);
    }

    #[test]
    fn fitted_counts_scale_the_density_to_the_histogram() {
        // n * w * pdf(mean) = 10 * 0.5 / sqrt(2 pi) = 1.9947114020071635
        assert!(close(
            fitted_count(3.0, 3.0, 1.0, 10, 0.5),
            1.994_711_402_007_163_5
        ));
        // One std away: times exp(-1/2).
        let ratio = fitted_count(4.0, 3.0, 1.0, 10, 0.5) / fitted_count(3.0, 3.0, 1.0, 10, 0.5);
        assert!(close(ratio, (-0.5f64).exp()));
        // Summed over bins of width w, the fitted counts add up to n.
        let (n, w) = (20, 0.25);
        let total: f64 = (-80..80)
            .map(|i| fitted_count(80.0 + (i as f64 + 0.5) * w, 80.0, 1.3, n, w))
            .sum();
        assert!((total - n as f64).abs() < 1e-3, "{total}");
    }

    #[test]
    fn label_decimals_give_two_significant_digits_of_std() {
        assert_eq!(stat_decimals(Some(0.12), 80.4), 2);
        assert_eq!(stat_decimals(Some(1.5), 80.4), 1);
        assert_eq!(stat_decimals(Some(0.0012), 0.8), 4);
        assert_eq!(stat_decimals(None, 80.4), 2);
        assert_eq!(stat_decimals(Some(0.0), 0.8), 4);
    }

    #[test]
    fn histogram_draws_bars_and_curve() {
        let values: Vec<f64> = (0..50)
            .map(|i| {
                80.0 + 0.3 * ((i * 37 % 50) as f64 / 50.0 - 0.5)
                    + 0.1 * ((i % 7) as f64 - 3.0) / 3.0
            })
            .collect();
        let img = render_seed_histogram(&values, "ResNet-50 A2, 50 seeds").unwrap();
        assert_eq!(img.dimensions(), (FIGURE_WIDTH_PX, FIGURE_HEIGHT_PX));
        let bar = tint(palette(0), 0.45);
        assert!(count_colour(&img, 0, FIGURE_WIDTH_PX, [bar.0, bar.1, bar.2]) > 5000);
        assert!(
            count_colour(&img, 0, FIGURE_WIDTH_PX, run_colour(1)) > 300,
            "normal curve"
        );
    }

    #[test]
    fn degenerate_histograms_do_not_panic() {
        for values in [
            &[][..],
            &[f64::NAN][..],
            &[80.0][..],
            &[80.0, 80.0, 80.0][..],
            &[0.0][..],
            &[1.0, 2.0][..],
        ] {
            let img = render_seed_histogram(values, "t").unwrap();
            assert!(count_ink(&img) > 300, "{values:?}");
            // No curve without a std.
            if values.len() < 2 || values[0] == values[values.len() - 1] {
                assert_eq!(
                    count_colour(&img, 0, FIGURE_WIDTH_PX, run_colour(1)),
                    0,
                    "{values:?}"
                );
            }
        }
    }
}
