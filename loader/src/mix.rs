//! Mixup and CutMix in timm's batch mode (`timm/data/mixup.py`, v0.5.4), as one definition of
//! the draws and the box shared by the host (u8 batches, here) and the device (the trainer's
//! tensor version applies the same [`MixDraw`]).
//!
//! Per device batch: with probability `mix_prob` mix; CutMix with probability `switch_prob`
//! (when both alphas are positive), else Mixup; λ ~ Beta(α, α). Sample i is mixed with sample
//! `B - 1 - i` (the reversed batch). CutMix pastes one box, its size from λ (`cut = int(side ·
//! sqrt(1 - λ))`), its centre uniform over the image, clipped at the borders, and λ becomes
//! the share of the image left uncovered. Targets are smoothed one-hot vectors mixed with λ.
//! The draws are a function of (seed, epoch, step) only.

use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// Mixup/CutMix settings (timm's `Mixup` arguments, batch mode, `correct_lam` on).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MixConfig {
    /// Mixup α (0 disables Mixup). RSB: 0.2 (A1), 0.1 (A2, A3).
    pub mixup_alpha: f64,
    /// CutMix α (0 disables CutMix). RSB: 1.0.
    pub cutmix_alpha: f64,
    /// Probability of mixing a batch at all (timm `--mixup-prob`, 1.0).
    pub mix_prob: f64,
    /// Probability of CutMix rather than Mixup when both are on (timm `--mixup-switch-prob`, 0.5).
    pub switch_prob: f64,
    /// Label smoothing ε folded into the targets (timm `--smoothing`).
    pub label_smoothing: f64,
}

impl MixConfig {
    /// Whether any mixing can happen.
    pub fn enabled(&self) -> bool {
        self.mix_prob > 0.0 && (self.mixup_alpha > 0.0 || self.cutmix_alpha > 0.0)
    }

    /// The draw for device batch `step` of `epoch`, for images of `height` x `width`.
    pub fn draw(&self, seed: u64, epoch: u64, step: u64, height: usize, width: usize) -> MixDraw {
        let mut rng = Rng::for_item(seed, &[0x4d49_5855, epoch, step]);
        self.draw_with(&mut rng, height, width)
    }

    /// The draw from `rng` (timm's `_params_per_batch` then `cutmix_bbox_and_lam`).
    pub fn draw_with(&self, rng: &mut Rng, height: usize, width: usize) -> MixDraw {
        let none = MixDraw {
            lam: 1.0,
            kind: MixKind::None,
        };
        if !self.enabled() || rng.f64() >= self.mix_prob {
            return none;
        }
        let cutmix = if self.mixup_alpha > 0.0 && self.cutmix_alpha > 0.0 {
            rng.f64() < self.switch_prob
        } else {
            self.cutmix_alpha > 0.0
        };
        let alpha = if cutmix {
            self.cutmix_alpha
        } else {
            self.mixup_alpha
        };
        let lam = beta(rng, alpha, alpha);
        if !cutmix {
            return MixDraw {
                lam,
                kind: MixKind::Mixup,
            };
        }
        let cy = rng.below(height as u64) as usize;
        let cx = rng.below(width as u64) as usize;
        let (b, lam) = cutmix_box(height, width, lam, cy, cx);
        MixDraw {
            lam,
            kind: MixKind::CutMix(b),
        }
    }
}

/// What happens to one batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MixDraw {
    /// Weight of each sample's own label (for CutMix, corrected to the uncovered share).
    pub lam: f64,
    /// How the images are mixed.
    pub kind: MixKind,
}

/// The image operation of a draw.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MixKind {
    /// Nothing (λ = 1).
    None,
    /// `x_i = λ x_i + (1 - λ) x_{B-1-i}`.
    Mixup,
    /// Rows `y0..y1`, columns `x0..x1` of every image come from its partner.
    CutMix(CutBox),
}

/// A CutMix box: rows `y0..y1` and columns `x0..x1` (end exclusive).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CutBox {
    /// First row.
    pub y0: usize,
    /// One past the last row.
    pub y1: usize,
    /// First column.
    pub x0: usize,
    /// One past the last column.
    pub x1: usize,
}

/// timm's `rand_bbox` for a given centre (`cy`, `cx`) plus the λ correction: the box of
/// `int(H · sqrt(1 - λ))` x `int(W · sqrt(1 - λ))` around the centre (half sizes rounded
/// down), clipped to the image; λ = 1 - box area / image area.
pub fn cutmix_box(height: usize, width: usize, lam: f64, cy: usize, cx: usize) -> (CutBox, f64) {
    let ratio = (1.0 - lam).sqrt();
    let cut_h = (height as f64 * ratio) as i64;
    let cut_w = (width as f64 * ratio) as i64;
    let (h, w, cy, cx) = (height as i64, width as i64, cy as i64, cx as i64);
    let b = CutBox {
        y0: (cy - cut_h / 2).clamp(0, h) as usize,
        y1: (cy + cut_h / 2).clamp(0, h) as usize,
        x0: (cx - cut_w / 2).clamp(0, w) as usize,
        x1: (cx + cut_w / 2).clamp(0, w) as usize,
    };
    let area = ((b.y1 - b.y0) * (b.x1 - b.x0)) as f64;
    (b, 1.0 - area / (height * width) as f64)
}

/// Mixes a batch of u8 NHWC images in place as timm's `FastCollateMixup` does in batch mode:
/// Mixup in single precision, `λ x_i + (1 - λ) x_j` rounded half to even; CutMix copies the
/// box from the partner. `images` holds `batch` images of `height * width * channels` bytes.
/// Panics if the batch size is odd and a draw mixes (timm asserts the same).
pub fn mix_u8_batch(
    images: &mut [u8],
    batch: usize,
    height: usize,
    width: usize,
    channels: usize,
    draw: &MixDraw,
) {
    let len = height * width * channels;
    assert_eq!(images.len(), batch * len, "batch buffer size");
    if draw.kind == MixKind::None {
        return;
    }
    assert!(
        batch.is_multiple_of(2),
        "Mixup/CutMix needs an even batch size, got {batch}"
    );
    let (first, second) = images.split_at_mut(batch / 2 * len);
    for i in 0..batch / 2 {
        let a = &mut first[i * len..(i + 1) * len];
        let j = batch / 2 - 1 - i;
        let b = &mut second[j * len..(j + 1) * len];
        match draw.kind {
            MixKind::None => {}
            MixKind::Mixup => {
                let l = draw.lam as f32;
                let r = (1.0 - draw.lam) as f32;
                // Adding and removing 2^23 rounds a float in [0, 2^23) to the nearest integer,
                // ties to even (np.rint), in the default rounding mode, and vectorises where
                // `round_ties_even` is a library call.
                const MAGIC: f32 = 8_388_608.0;
                let rint = |v: f32| ((v + MAGIC) - MAGIC) as u8;
                for (x, y) in a.iter_mut().zip(b.iter_mut()) {
                    let (xf, yf) = (*x as f32, *y as f32);
                    *x = rint(xf * l + yf * r);
                    *y = rint(yf * l + xf * r);
                }
            }
            MixKind::CutMix(bx) => {
                let row = width * channels;
                for y in bx.y0..bx.y1 {
                    let s = y * row + bx.x0 * channels;
                    let e = y * row + bx.x1 * channels;
                    a[s..e].swap_with_slice(&mut b[s..e]);
                }
            }
        }
    }
}

/// timm's `mixup_target`: row i is `λ · onehot(y_i) + (1 - λ) · onehot(y_{B-1-i})` with
/// off value `ε / C` and on value `1 - ε + ε / C`, in single precision as torch computes it.
/// Returns `labels.len() * num_classes` values, row-major.
pub fn mixed_targets(labels: &[u32], num_classes: usize, lam: f64, smoothing: f64) -> Vec<f32> {
    let off = smoothing / num_classes as f64;
    let on = 1.0 - smoothing + off;
    let (off, on) = (off as f32, on as f32);
    let (l, r) = (lam as f32, (1.0 - lam) as f32);
    let b = labels.len();
    let mut out = vec![0f32; b * num_classes];
    for (i, row) in out.chunks_exact_mut(num_classes).enumerate() {
        let (yi, yj) = (labels[i] as usize, labels[b - 1 - i] as usize);
        for (k, v) in row.iter_mut().enumerate() {
            let t1 = if k == yi { on } else { off };
            let t2 = if k == yj { on } else { off };
            *v = t1 * l + t2 * r;
        }
    }
    out
}

/// A Beta(a, b) draw: Jöhnk's method when both parameters are at most 1 (in log space when
/// the powers underflow, as NumPy does), otherwise the ratio of two Gamma draws.
pub fn beta(rng: &mut Rng, a: f64, b: f64) -> f64 {
    if a <= 1.0 && b <= 1.0 {
        loop {
            let u = rng.f64();
            let v = rng.f64();
            let x = u.powf(1.0 / a);
            let y = v.powf(1.0 / b);
            if x + y <= 1.0 {
                if x + y > 0.0 {
                    return x / (x + y);
                }
                let lx = u.ln() / a;
                let ly = v.ln() / b;
                if !lx.is_finite() || !ly.is_finite() {
                    continue;
                }
                let m = lx.max(ly);
                let (lx, ly) = (lx - m, ly - m);
                return (lx - (lx.exp() + ly.exp()).ln()).exp();
            }
        }
    }
    let x = gamma(rng, a);
    let y = gamma(rng, b);
    x / (x + y)
}

/// A Gamma(shape, 1) draw (Marsaglia and Tsang; shapes below 1 boosted by `U^(1/shape)`).
fn gamma(rng: &mut Rng, shape: f64) -> f64 {
    if shape < 1.0 {
        let u = 1.0 - rng.f64();
        return gamma(rng, shape + 1.0) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = rng.normal();
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u = 1.0 - rng.f64();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mean_var(xs: &[f64]) -> (f64, f64) {
        let m = xs.iter().sum::<f64>() / xs.len() as f64;
        let v = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / xs.len() as f64;
        (m, v)
    }

    #[test]
    fn beta_has_the_right_moments() {
        let mut rng = Rng::new(3);
        for (a, b) in [(0.1, 0.1), (0.2, 0.2), (1.0, 1.0), (2.0, 3.0)] {
            let xs: Vec<f64> = (0..40_000).map(|_| beta(&mut rng, a, b)).collect();
            assert!(xs.iter().all(|x| (0.0..=1.0).contains(x)));
            let (m, v) = mean_var(&xs);
            let em = a / (a + b);
            let ev = a * b / ((a + b) * (a + b) * (a + b + 1.0));
            assert!((m - em).abs() < 0.01, "Beta({a},{b}) mean {m} vs {em}");
            assert!((v - ev).abs() < 0.01, "Beta({a},{b}) var {v} vs {ev}");
        }
    }

    #[test]
    fn draws_follow_the_switch_probability() {
        let cfg = MixConfig {
            mixup_alpha: 0.1,
            cutmix_alpha: 1.0,
            mix_prob: 1.0,
            switch_prob: 0.5,
            label_smoothing: 0.0,
        };
        let mut cut = 0;
        for step in 0..4000 {
            let d = cfg.draw(7, 0, step, 224, 224);
            assert_eq!(d, cfg.draw(7, 0, step, 224, 224));
            if let MixKind::CutMix(b) = d.kind {
                cut += 1;
                let area = ((b.y1 - b.y0) * (b.x1 - b.x0)) as f64;
                assert!((d.lam - (1.0 - area / (224.0 * 224.0))).abs() < 1e-12);
            } else {
                assert_eq!(d.kind, MixKind::Mixup);
            }
        }
        assert!((1850..2150).contains(&cut), "{cut}");
    }

    #[test]
    fn cutmix_swaps_the_box_between_partners() {
        let (b, h, w, c) = (4, 3, 4, 1);
        let mut imgs: Vec<u8> = (0..b)
            .flat_map(|i| std::iter::repeat_n(i as u8 * 10, h * w * c))
            .collect();
        let bx = CutBox {
            y0: 1,
            y1: 3,
            x0: 0,
            x1: 2,
        };
        let draw = MixDraw {
            lam: 0.5,
            kind: MixKind::CutMix(bx),
        };
        mix_u8_batch(&mut imgs, b, h, w, c, &draw);
        // Image 0's box comes from image 3, image 1's from image 2, and back.
        assert_eq!(imgs[4], 30);
        assert_eq!(imgs[0], 0);
        assert_eq!(imgs[12 + 4], 20);
        assert_eq!(imgs[36 + 4], 0);
        assert_eq!(imgs[36], 30);
    }
}
