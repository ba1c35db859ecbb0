//! timm's geometric transforms as pure functions of the image size and a random generator:
//! where to crop, how to resize, whether to flip. The pixels are moved by [`crate::resize`].
//!
//! - Train (`RandomResizedCropAndInterpolation`, timm v0.5.4 `data/transforms.py`): up to 10
//!   attempts of area `U(0.08, 1) * W * H` and aspect `exp(U(ln 3/4, ln 4/3))`, side lengths
//!   rounded half to even (Python's `round`), accepted if the box fits; position uniform over the
//!   integer offsets. After 10 failures, the centre crop with the aspect clamped to [3/4, 4/3].
//!   Then a horizontal flip with probability 0.5.
//! - Eval (`transforms_imagenet_eval`): resize the shorter side to `floor(size / crop_pct)`
//!   (longer side `int(scale * long / short)`, as torchvision), then a centre crop of `size`
//!   with offsets `round((H - size) / 2)`.

use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// Resampling filter (PIL semantics: antialiased when downscaling).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    /// PIL `BILINEAR` (triangle filter).
    Bilinear,
    /// PIL `BICUBIC` (a = -0.5).
    Bicubic,
}

/// Interpolation setting of the train transform: one filter, or a uniform choice per sample
/// between bilinear and bicubic (timm's `'random'`, its default `--train-interpolation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainInterpolation {
    /// Always bilinear.
    Bilinear,
    /// Always bicubic.
    Bicubic,
    /// Bilinear or bicubic with probability 1/2 each, per sample.
    Random,
}

impl std::str::FromStr for TrainInterpolation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bilinear" => Ok(Self::Bilinear),
            "bicubic" => Ok(Self::Bicubic),
            "random" => Ok(Self::Random),
            _ => Err(format!(
                "unknown interpolation {s:?}: expected bilinear, bicubic or random"
            )),
        }
    }
}

/// A box in source pixels: `left`, `top`, `width`, `height`. Integer for the train crop,
/// fractional for the eval transform (the source region that the centre crop of the resized
/// image covers).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CropBox {
    /// Left edge.
    pub left: f64,
    /// Top edge.
    pub top: f64,
    /// Width.
    pub width: f64,
    /// Height.
    pub height: f64,
}

/// Where and how one sample is cropped and resized.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleGeometry {
    /// Source region.
    pub crop: CropBox,
    /// Output side (square).
    pub size: u32,
    /// Filter.
    pub interpolation: Interpolation,
    /// Mirror horizontally after resizing.
    pub flip: bool,
    /// The crop came from the fallback (10 attempts failed); for tests and statistics.
    pub fallback: bool,
}

/// Python 3's `round`: to nearest, ties to even.
pub fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

/// RandomResizedCrop scale and ratio ranges.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RrcConfig {
    /// Area fraction range, (0.08, 1.0) in timm.
    pub scale: (f64, f64),
    /// Aspect ratio range, (3/4, 4/3).
    pub ratio: (f64, f64),
}

impl Default for RrcConfig {
    fn default() -> Self {
        RrcConfig {
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
        }
    }
}

/// timm's `RandomResizedCropAndInterpolation.get_params`: returns the integer box and whether
/// the fallback was taken.
pub fn rrc_box(width: u32, height: u32, cfg: &RrcConfig, rng: &mut Rng) -> (CropBox, bool) {
    let (w_img, h_img) = (width as f64, height as f64);
    let area = w_img * h_img;
    let (log_lo, log_hi) = (cfg.ratio.0.ln(), cfg.ratio.1.ln());
    for _ in 0..10 {
        let target_area = rng.uniform(cfg.scale.0, cfg.scale.1) * area;
        let aspect = rng.uniform(log_lo, log_hi).exp();
        let w = round_half_even((target_area * aspect).sqrt());
        let h = round_half_even((target_area / aspect).sqrt());
        if w <= w_img && h <= h_img && w >= 1.0 && h >= 1.0 {
            let top = rng.range_inclusive(0, (h_img - h) as u32) as f64;
            let left = rng.range_inclusive(0, (w_img - w) as u32) as f64;
            return (
                CropBox {
                    left,
                    top,
                    width: w,
                    height: h,
                },
                false,
            );
        }
    }
    // Fallback: centre crop, aspect clamped to the ratio range.
    let in_ratio = w_img / h_img;
    let (w, h) = if in_ratio < cfg.ratio.0.min(cfg.ratio.1) {
        (w_img, round_half_even(w_img / cfg.ratio.0.min(cfg.ratio.1)))
    } else if in_ratio > cfg.ratio.0.max(cfg.ratio.1) {
        (round_half_even(h_img * cfg.ratio.0.max(cfg.ratio.1)), h_img)
    } else {
        (w_img, h_img)
    };
    let top = ((h_img - h) / 2.0).floor();
    let left = ((w_img - w) / 2.0).floor();
    (
        CropBox {
            left,
            top,
            width: w,
            height: h,
        },
        true,
    )
}

/// The train transform's geometry for one sample: crop box, filter, flip, drawn in that order.
pub fn train_geometry(
    width: u32,
    height: u32,
    size: u32,
    cfg: &RrcConfig,
    interpolation: TrainInterpolation,
    rng: &mut Rng,
) -> SampleGeometry {
    let (crop, fallback) = rrc_box(width, height, cfg, rng);
    let interpolation = match interpolation {
        TrainInterpolation::Bilinear => Interpolation::Bilinear,
        TrainInterpolation::Bicubic => Interpolation::Bicubic,
        TrainInterpolation::Random => {
            if rng.below(2) == 0 {
                Interpolation::Bilinear
            } else {
                Interpolation::Bicubic
            }
        }
    };
    let flip = rng.f64() < 0.5;
    SampleGeometry {
        crop,
        size,
        interpolation,
        flip,
        fallback,
    }
}

/// The eval transform's geometry: resize so the shorter side is `floor(size / crop_pct)`, then
/// take the centre `size` x `size`, expressed as the source region that crop covers.
pub fn eval_geometry(
    width: u32,
    height: u32,
    size: u32,
    crop_pct: f64,
    interpolation: Interpolation,
) -> SampleGeometry {
    let scale_size = (size as f64 / crop_pct).floor();
    let (w, h) = (width as f64, height as f64);
    // torchvision Resize(int): shorter side to scale_size, longer side truncated.
    let (new_w, new_h) = if w <= h {
        (scale_size, (scale_size * h / w).trunc())
    } else {
        ((scale_size * w / h).trunc(), scale_size)
    };
    // CenterCrop: offsets round((H - size) / 2), in the resized image.
    let s = size as f64;
    let top = round_half_even((new_h - s) / 2.0);
    let left = round_half_even((new_w - s) / 2.0);
    let (sx, sy) = (w / new_w, h / new_h);
    let (left, top) = (left * sx, top * sy);
    SampleGeometry {
        // The box lies inside the image; the products can pass its edge by an ulp (with
        // crop_pct 1, `size * (w / size)` may round above `w`), which the resizer refuses.
        crop: CropBox {
            left,
            top,
            width: (s * sx).min(w - left),
            height: (s * sy).min(h - top),
        },
        size,
        interpolation,
        flip: false,
        fallback: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_rounding() {
        assert_eq!(round_half_even(0.5), 0.0);
        assert_eq!(round_half_even(1.5), 2.0);
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(2.4), 2.0);
        assert_eq!(round_half_even(2.6), 3.0);
    }

    #[test]
    fn eval_boxes_stay_inside_the_image() {
        for width in 20..140u32 {
            for height in [width, width + 1, width * 2 - 3, 97] {
                for size in [24u32, 32, 40, 48, 56, 64, 224] {
                    for crop_pct in [0.875, 0.95, 1.0] {
                        let g =
                            eval_geometry(width, height, size, crop_pct, Interpolation::Bilinear);
                        let b = g.crop;
                        assert!(
                            b.left >= 0.0 && b.top >= 0.0,
                            "{width}x{height} {size} {b:?}"
                        );
                        assert!(
                            b.left + b.width <= width as f64 && b.top + b.height <= height as f64,
                            "{width}x{height} size {size} crop {crop_pct}: {b:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rrc_boxes_respect_bounds_or_fall_back() {
        let cfg = RrcConfig::default();
        let mut fallbacks = 0;
        for seed in 0..20_000u64 {
            let mut rng = Rng::new(seed);
            let w = 20 + (seed * 7919 % 600) as u32;
            let h = 20 + (seed * 104_729 % 600) as u32;
            let (b, fb) = rrc_box(w, h, &cfg, &mut rng);
            assert!(b.left >= 0.0 && b.top >= 0.0, "{b:?}");
            assert!(
                b.left + b.width <= w as f64 && b.top + b.height <= h as f64,
                "{w}x{h} {b:?}"
            );
            assert_eq!(b.left.fract(), 0.0);
            assert_eq!(b.width.fract(), 0.0);
            if fb {
                fallbacks += 1;
                // The aspect is clamped to [3/4, 4/3], up to rounding the other side to a pixel.
                let r = b.width / b.height;
                let slack = 1.0 / b.height.min(b.width);
                assert!(
                    (0.75 - slack..=4.0 / 3.0 + slack).contains(&r)
                        || (b.width == w as f64 && b.height == h as f64),
                    "{w}x{h}: fallback {b:?}"
                );
            } else {
                // Rounded sides: area and ratio within the ranges up to rounding by half a pixel.
                let area = b.width * b.height / (w as f64 * h as f64);
                let slack = (b.width + b.height + 1.0) / (w as f64 * h as f64);
                assert!(area >= 0.08 - slack && area <= 1.0 + slack, "area {area}");
                let r = b.width / b.height;
                let rs = 0.5 / b.height.min(b.width) * 2.5;
                assert!(
                    r >= 0.75 * (1.0 - rs) && r <= 4.0 / 3.0 * (1.0 + rs),
                    "ratio {r} {b:?}"
                );
            }
        }
        // Sides drawn independently from 20..620 px make many very elongated images, where 10
        // attempts can fail (about 11 % here); most draws succeed.
        assert!(fallbacks > 0 && fallbacks < 4000, "{fallbacks}");
    }

    #[test]
    fn fallback_clamps_aspect() {
        let cfg = RrcConfig {
            scale: (2.0, 3.0),
            ..RrcConfig::default()
        };
        let mut rng = Rng::new(1);
        let (b, fb) = rrc_box(1000, 100, &cfg, &mut rng);
        assert!(fb);
        assert_eq!((b.width, b.height), (133.0, 100.0));
        assert_eq!((b.left, b.top), (433.0, 0.0));
        // 300x200 is wider than 4/3: 267x200 in the middle (266.67 rounded).
        let (b, _) = rrc_box(300, 200, &cfg, &mut rng);
        assert_eq!(
            (b.left, b.top, b.width, b.height),
            (16.0, 0.0, 267.0, 200.0)
        );
        // Inside the ratio range the whole image is the crop.
        let (b, _) = rrc_box(300, 250, &cfg, &mut rng);
        assert_eq!((b.left, b.top, b.width, b.height), (0.0, 0.0, 300.0, 250.0));
    }

    #[test]
    fn eval_geometry_matches_torchvision_arithmetic() {
        // 500x375 at 224 / 0.95: resize to 313x235 (int(235 * 500 / 375) = 313), crop at (44, 6).
        let g = eval_geometry(500, 375, 224, 0.95, Interpolation::Bicubic);
        let s = 500.0 / 313.0;
        assert!((g.crop.left - 44.0 * s).abs() < 1e-9);
        assert!((g.crop.top - 6.0 * 375.0 / 235.0).abs() < 1e-9);
        assert!((g.crop.width - 224.0 * s).abs() < 1e-9);
    }
}
