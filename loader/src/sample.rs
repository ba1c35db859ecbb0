//! One sample from JPEG bytes to its slot in the batch: decode, crop and resize, flip, and the
//! augmentation hook, each sample's draws from its own generator.

use std::sync::Arc;
use std::time::Instant;

use fast_image_resize as fr;
use serde::{Deserialize, Serialize};

use crate::decode::{CropRequest, DecodeOptions, Decoder, DecoderKind};
use crate::rng::{self, Rng};
use crate::transform::{
    eval_geometry, train_geometry, Interpolation, RrcConfig, SampleGeometry, TrainInterpolation,
};

/// The per-sample transform.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Transform {
    /// timm's train transform: RandomResizedCrop, horizontal flip, then the augmentation hook.
    Train {
        /// Output side in pixels (224, or 160 for A3).
        size: u32,
        /// Scale and ratio ranges.
        rrc: RrcConfig,
        /// Filter choice.
        interpolation: TrainInterpolation,
    },
    /// timm's eval transform: shorter side to `floor(size / crop_pct)`, centre crop `size`.
    Eval {
        /// Output side in pixels.
        size: u32,
        /// Crop fraction (0.95 for the RSB models, 0.875 for classic ImageNet eval).
        crop_pct: f64,
        /// Filter (bicubic for the RSB models).
        interpolation: Interpolation,
    },
}

impl Transform {
    /// The RSB train transform at `size` (random bilinear/bicubic, timm's default).
    pub fn train(size: u32) -> Self {
        Transform::Train {
            size,
            rrc: RrcConfig::default(),
            interpolation: TrainInterpolation::Random,
        }
    }

    /// The RSB eval transform at `size`: crop_pct 0.95, bicubic.
    pub fn eval(size: u32) -> Self {
        Transform::Eval {
            size,
            crop_pct: 0.95,
            interpolation: Interpolation::Bicubic,
        }
    }

    /// Output side in pixels.
    pub fn size(&self) -> u32 {
        match self {
            Transform::Train { size, .. } | Transform::Eval { size, .. } => *size,
        }
    }
}

/// Per-image augmentation applied in place after the flip (RandAugment plugs in here). It gets
/// the sample's generator after the crop and flip draws, so its draws are as deterministic as
/// theirs.
pub trait Augment: Send + Sync {
    /// Augments `image` (u8 RGB, `size` x `size`, rows packed).
    fn apply(&self, image: &mut [u8], size: u32, rng: &mut Rng);
}

/// Seconds spent per stage, summed over samples.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StageTimes {
    /// Decoding (including header parsing).
    pub decode_s: f64,
    /// Crop, resize and flip.
    pub resize_s: f64,
    /// The augmentation hook.
    pub augment_s: f64,
}

/// A worker's reusable state: decoder, resizer, scratch buffer.
pub struct SampleProcessor {
    decoder: Decoder,
    resizer: fr::Resizer,
    scratch: Vec<u8>,
    transform: Transform,
    decode_opts: DecodeOptions,
    augment: Option<Arc<dyn Augment>>,
    /// Stage times since creation.
    pub times: StageTimes,
}

impl SampleProcessor {
    /// A processor for `transform`.
    pub fn new(
        transform: Transform,
        decoder: DecoderKind,
        decode_opts: DecodeOptions,
        augment: Option<Arc<dyn Augment>>,
    ) -> Result<Self, String> {
        Ok(SampleProcessor {
            decoder: Decoder::new(decoder)?,
            resizer: fr::Resizer::new(),
            scratch: Vec::new(),
            transform,
            decode_opts,
            augment,
            times: StageTimes::default(),
        })
    }

    /// The geometry of a sample of `width` x `height` drawn from `rng`.
    pub fn geometry(&self, width: u32, height: u32, rng: &mut Rng) -> SampleGeometry {
        match &self.transform {
            Transform::Train {
                size,
                rrc,
                interpolation,
            } => train_geometry(width, height, *size, rrc, *interpolation, rng),
            Transform::Eval {
                size,
                crop_pct,
                interpolation,
            } => eval_geometry(width, height, *size, *crop_pct, *interpolation),
        }
    }

    /// Transforms one JPEG into `out` (`size * size * 3` bytes, u8 RGB), with the generator of
    /// (seed, epoch, position).
    pub fn process(
        &mut self,
        jpeg: &[u8],
        seed: u64,
        epoch: u64,
        position: u64,
        out: &mut [u8],
    ) -> Result<(), String> {
        let mut rng = rng::sample_rng(seed, epoch, position);
        let t0 = Instant::now();
        let (w, h) = self.decoder.size(jpeg)?;
        let g = self.geometry(w, h, &mut rng);
        let mode = match self.transform {
            Transform::Train { .. } => CropMode::Isolated,
            Transform::Eval { .. } => CropMode::InImage,
        };
        let request = CropRequest {
            crop: g.crop,
            size: g.size,
            in_image: mode == CropMode::InImage,
        };
        let region =
            self.decoder
                .decode(jpeg, Some(request), self.decode_opts, &mut self.scratch)?;
        let t1 = Instant::now();
        resize_into(
            &mut self.resizer,
            &self.scratch,
            (region.width, region.height),
            region.crop,
            mode,
            g.interpolation,
            g.size,
            out,
        )?;
        if g.flip {
            flip_horizontal(out, g.size as usize);
        }
        let t2 = Instant::now();
        if let Some(a) = &self.augment {
            a.apply(out, g.size, &mut rng);
        }
        let t3 = Instant::now();
        self.times.decode_s += (t1 - t0).as_secs_f64();
        self.times.resize_s += (t2 - t1).as_secs_f64();
        self.times.augment_s += (t3 - t2).as_secs_f64();
        Ok(())
    }

    /// A full decode only (the benchmark baseline): no crop, no resize.
    pub fn decode_only(&mut self, jpeg: &[u8]) -> Result<(u32, u32), String> {
        let t0 = Instant::now();
        let r = self
            .decoder
            .decode(jpeg, None, DecodeOptions::default(), &mut self.scratch)?;
        self.times.decode_s += t0.elapsed().as_secs_f64();
        Ok((r.width, r.height))
    }
}

/// How a crop relates to the image around it when resizing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CropMode {
    /// PIL's `img.crop(box).resize(..)` (RandomResizedCrop): the crop is an image of its own,
    /// and the filter never reads pixels outside it.
    Isolated,
    /// Resize the whole image, then crop (the eval transform): the filter reads the pixels
    /// around the box like anywhere else in the image.
    InImage,
}

/// Resizes the `crop` region of `src` (RGB8, `src_size`) to `size` x `size` into `out`, with
/// PIL-style antialiasing (fast_image_resize's convolution follows Pillow's resampling).
/// [`CropMode::Isolated`] needs an integer box; a fractional one (after DCT scaling) is
/// resized as [`CropMode::InImage`], which differs only in the filter taps at the crop's edges.
#[allow(clippy::too_many_arguments)]
pub fn resize_into(
    resizer: &mut fr::Resizer,
    src: &[u8],
    src_size: (u32, u32),
    crop: crate::transform::CropBox,
    mode: CropMode,
    interpolation: Interpolation,
    size: u32,
    out: &mut [u8],
) -> Result<(), String> {
    let src = fr::images::ImageRef::new(src_size.0, src_size.1, src, fr::PixelType::U8x3)
        .map_err(|e| format!("resize: {e}"))?;
    let mut dst = fr::images::Image::from_slice_u8(size, size, out, fr::PixelType::U8x3)
        .map_err(|e| format!("resize: {e}"))?;
    let filter = match interpolation {
        Interpolation::Bilinear => fr::FilterType::Bilinear,
        // PIL's BICUBIC is the cubic convolution with a = -0.5, i.e. Catmull-Rom.
        Interpolation::Bicubic => fr::FilterType::CatmullRom,
    };
    let alg = fr::ResizeAlg::Convolution(filter);
    let integral = [crop.left, crop.top, crop.width, crop.height]
        .iter()
        .all(|v| v.fract() == 0.0);
    if mode == CropMode::Isolated && integral {
        let view = fr::images::CroppedImage::new(
            &src,
            crop.left as u32,
            crop.top as u32,
            crop.width as u32,
            crop.height as u32,
        )
        .map_err(|e| format!("resize: crop {crop:?}: {e}"))?;
        resizer
            .resize(&view, &mut dst, &fr::ResizeOptions::new().resize_alg(alg))
            .map_err(|e| format!("resize: {e}"))
    } else {
        let opts = fr::ResizeOptions::new()
            .crop(crop.left, crop.top, crop.width, crop.height)
            .resize_alg(alg);
        resizer
            .resize(&src, &mut dst, &opts)
            .map_err(|e| format!("resize: {e}"))
    }
}

/// Mirrors a square RGB8 image of side `size` left to right, in place.
pub fn flip_horizontal(img: &mut [u8], size: usize) {
    for row in img.chunks_exact_mut(size * 3) {
        let (mut l, mut r) = (0, size - 1);
        while l < r {
            for c in 0..3 {
                row.swap(l * 3 + c, r * 3 + c);
            }
            l += 1;
            r -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flip_twice_is_identity() {
        let img: Vec<u8> = (0..5 * 5 * 3).map(|i| i as u8).collect();
        let mut f = img.clone();
        flip_horizontal(&mut f, 5);
        assert_eq!(&f[0..3], &img[12..15]);
        assert_ne!(f, img);
        flip_horizontal(&mut f, 5);
        assert_eq!(f, img);
    }
}
