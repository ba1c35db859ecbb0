//! Mixup and CutMix on device tensors, with the same draws as the host version
//! ([`loader::mix`]): one [`MixDraw`] per device batch, made by
//! [`MixConfig::draw`](loader::mix::MixConfig::draw) from (seed, epoch, step), applied either
//! to the u8 host batch ([`loader::mix::mix_u8_batch`], timm's `FastCollateMixup`) or here to a
//! tensor already on the device (what the CUDA trainer does, before normalisation).
//!
//! On a tensor holding u8 values (as f32/bf16, before normalisation) with `round` set, the
//! result equals the host version byte for byte: Mixup rounds half to even like `np.rint`.

use candle_core::{DType, Device, Result, Tensor};
use loader::mix::{mixed_targets, MixDraw, MixKind};

/// Where the channels are in a 4-D image batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageLayout {
    /// `[batch, channels, height, width]`.
    Nchw,
    /// `[batch, height, width, channels]` (channels-last).
    Nhwc,
}

/// Applies `draw` to the image batch `xs` (partner of sample i: sample `B - 1 - i`).
/// `round`: round Mixup results to integers, half to even (for u8-valued input, to match the
/// host version exactly); leave it off for normalised input.
///
/// # Shapes
/// `xs`: `[B, C, H, W]` or `[B, H, W, C]` per `layout`, any float dtype; returns the same.
pub fn mix_images(xs: &Tensor, draw: &MixDraw, layout: ImageLayout, round: bool) -> Result<Tensor> {
    let (b, ..) = xs.dims4()?;
    if draw.kind != MixKind::None && b % 2 != 0 {
        candle_core::bail!("Mixup/CutMix needs an even batch size, got {b}");
    }
    match draw.kind {
        MixKind::None => Ok(xs.clone()),
        MixKind::Mixup => {
            let dtype = xs.dtype();
            let x = xs.to_dtype(DType::F32)?;
            let partner = x.flip(&[0])?;
            // Single precision, as timm's collate: x * lam + partner * (1 - lam).
            let mixed = ((x * draw.lam)? + (partner * (1.0 - draw.lam))?)?;
            let mixed = if round {
                // Adding and removing 2^23 rounds to the nearest integer, ties to even.
                ((mixed + 8_388_608.0)? - 8_388_608.0)?
            } else {
                mixed
            };
            mixed.to_dtype(dtype)
        }
        MixKind::CutMix(bx) => {
            let (b, d1, d2, d3) = xs.dims4()?;
            let (h, w) = match layout {
                ImageLayout::Nchw => (d2, d3),
                ImageLayout::Nhwc => (d1, d2),
            };
            if bx.y0 >= bx.y1 || bx.x0 >= bx.x1 {
                // An empty box (lam == 1 after correction) leaves the batch as it is.
                return Ok(xs.clone());
            }
            if bx.y1 > h || bx.x1 > w {
                candle_core::bail!("CutMix box {bx:?} outside {h}x{w} images");
            }
            let partner = xs.flip(&[0])?;
            let (ys, xs_r) = (bx.y0..bx.y1, bx.x0..bx.x1);
            match layout {
                ImageLayout::Nchw => {
                    let patch =
                        partner
                            .narrow(2, bx.y0, bx.y1 - bx.y0)?
                            .narrow(3, bx.x0, bx.x1 - bx.x0)?;
                    xs.slice_assign(&[0..b, 0..d1, ys, xs_r], &patch)
                }
                ImageLayout::Nhwc => {
                    let patch =
                        partner
                            .narrow(1, bx.y0, bx.y1 - bx.y0)?
                            .narrow(2, bx.x0, bx.x1 - bx.x0)?;
                    xs.slice_assign(&[0..b, ys, xs_r, 0..d3], &patch)
                }
            }
        }
    }
}

/// The mixed, smoothed targets of `labels` as a `[B, num_classes]` f32 tensor (timm's
/// `mixup_target`; λ = 1 gives smoothed one-hot targets).
pub fn mix_targets(
    labels: &[u32],
    num_classes: usize,
    draw: &MixDraw,
    smoothing: f64,
    device: &Device,
) -> Result<Tensor> {
    let t = mixed_targets(labels, num_classes, draw.lam, smoothing);
    Tensor::from_vec(t, (labels.len(), num_classes), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use loader::mix::{mix_u8_batch, MixConfig};
    use loader::rng::Rng;

    /// The tensor version and the host version give the same bytes for the same draws.
    #[test]
    fn tensor_mixing_equals_the_host_version() -> Result<()> {
        let (b, h, w, c) = (6, 9, 7, 3);
        let mut rng = Rng::new(11);
        let host: Vec<u8> = (0..b * h * w * c).map(|_| rng.below(256) as u8).collect();
        let cfg = MixConfig {
            mixup_alpha: 0.2,
            cutmix_alpha: 1.0,
            mix_prob: 1.0,
            switch_prob: 0.5,
            label_smoothing: 0.1,
        };
        let dev = Device::Cpu;
        let mut kinds = (0, 0);
        for step in 0..40 {
            let draw = cfg.draw(3, 1, step, h, w);
            match draw.kind {
                MixKind::Mixup => kinds.0 += 1,
                MixKind::CutMix(_) => kinds.1 += 1,
                MixKind::None => {}
            }
            let mut want = host.clone();
            mix_u8_batch(&mut want, b, h, w, c, &draw);
            let f: Vec<f32> = host.iter().map(|&v| v as f32).collect();
            let nhwc = Tensor::from_vec(f, (b, h, w, c), &dev)?;
            let got = mix_images(&nhwc, &draw, ImageLayout::Nhwc, true)?;
            let got: Vec<u8> = got
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|&v| v as u8)
                .collect();
            assert_eq!(got, want, "NHWC, step {step}, {draw:?}");
            let nchw = nhwc.permute((0, 3, 1, 2))?.contiguous()?;
            let got = mix_images(&nchw, &draw, ImageLayout::Nchw, true)?
                .permute((0, 2, 3, 1))?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let got: Vec<u8> = got.iter().map(|&v| v as u8).collect();
            assert_eq!(got, want, "NCHW, step {step}, {draw:?}");
        }
        assert!(kinds.0 > 5 && kinds.1 > 5, "both kinds drawn: {kinds:?}");
        let t = mix_targets(
            &[0, 2, 1, 1, 0, 2],
            3,
            &MixDraw {
                lam: 0.75,
                kind: MixKind::Mixup,
            },
            0.0,
            &dev,
        )?;
        assert_eq!(t.to_vec2::<f32>()?[0], vec![0.75, 0.0, 0.25]);
        Ok(())
    }
}
