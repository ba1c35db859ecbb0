//! Host batches to device tensors: u8 NHWC images to normalised f32 NCHW, labels and dense
//! targets.
//!
//! Normalisation is timm's `PrefetchLoader`: `(x - 255 * mean) / (255 * std)` with the model's
//! mean and std ([`Normalization`]: ImageNet's, or 0.5 for the Vision Transformers, as timm's
//! `default_cfg`s give them to `resolve_data_config`), in f32, after the u8 bytes are on the
//! device (4x fewer bytes to copy than f32).
//! This is the seam for device-specific code: on CPU the "copy" is a host tensor; a CUDA build
//! keeps the same calls (pinned staging buffers would slot in here).

use candle_core::{DType, Device, Result, Tensor};

use crate::model::ActivationLayout;

/// ImageNet channel means (RGB), as timm's `IMAGENET_DEFAULT_MEAN`.
pub const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations (RGB), as timm's `IMAGENET_DEFAULT_STD`.
pub const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

/// The per-channel (RGB) mean and standard deviation images are normalised with, on the 0..1
/// scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Normalization {
    /// Channel means.
    pub mean: [f64; 3],
    /// Channel standard deviations.
    pub std: [f64; 3],
}

impl Normalization {
    /// timm's `IMAGENET_DEFAULT_MEAN` and `IMAGENET_DEFAULT_STD`: the `default_cfg` of the
    /// ResNets, RegNets and EfficientNets.
    pub const IMAGENET: Normalization = Normalization {
        mean: IMAGENET_MEAN,
        std: IMAGENET_STD,
    };

    /// timm's `IMAGENET_INCEPTION_MEAN` and `IMAGENET_INCEPTION_STD` (0.5 each): the
    /// `default_cfg` of the Vision Transformers in timm 0.5.4, which `train.py` and
    /// `validate.py` use unless `--mean`/`--std` are given.
    pub const INCEPTION: Normalization = Normalization {
        mean: [0.5; 3],
        std: [0.5; 3],
    };

    /// `255 * mean` and `255 * std` in f32, as the normalisation uses them (timm builds
    /// `torch.tensor([x * 255 for x in mean])`: the product in double, then f32).
    pub fn scaled(&self) -> ([f32; 3], [f32; 3]) {
        let scaled = |v: [f64; 3]| v.map(|x| (x * 255.0) as f32);
        (scaled(self.mean), scaled(self.std))
    }
}

/// Moves host batches to one device, normalising images on the way.
#[derive(Clone, Debug)]
pub struct Feed {
    device: Device,
    norm: Normalization,
    /// `255 * mean`, shape `[1, 3, 1, 1]`, f32.
    mean: Tensor,
    /// `255 * std`, shape `[1, 3, 1, 1]`, f32.
    std: Tensor,
}

impl Feed {
    /// A feed to `device` with the ImageNet statistics.
    pub fn new(device: &Device) -> Result<Self> {
        Self::with_normalization(device, Normalization::IMAGENET)
    }

    /// A feed to `device` normalising with `norm` (a model's: `NetConfig::normalization`).
    pub fn with_normalization(device: &Device, norm: Normalization) -> Result<Self> {
        let (mean, std) = norm.scaled();
        Ok(Feed {
            device: device.clone(),
            norm,
            mean: Tensor::new(&mean, device)?.reshape((1, 3, 1, 1))?,
            std: Tensor::new(&std, device)?.reshape((1, 3, 1, 1))?,
        })
    }

    /// The statistics this feed normalises with.
    pub fn normalization(&self) -> Normalization {
        self.norm
    }

    /// The target device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Normalised images.
    ///
    /// # Shapes
    /// `images`: `batch * size * size * 3` bytes, u8 NHWC RGB → `[batch, 3, size, size]` f32.
    pub fn images(&self, images: &[u8], batch: usize, size: usize) -> Result<Tensor> {
        let xs = Tensor::from_slice(images, (batch, size, size, 3), &self.device)?;
        xs.permute((0, 3, 1, 2))?
            .to_dtype(DType::F32)?
            .broadcast_sub(&self.mean)?
            .broadcast_div(&self.std)?
            .contiguous()
    }

    /// Normalised images in the layout a model takes: `[batch, 3, size, size]` f32 for
    /// [`ActivationLayout::Nchw`]; `[batch, size, size, 3]` for [`ActivationLayout::Nhwc`], in
    /// bf16 on CUDA (the fast path's activation dtype) and f32 elsewhere.
    pub fn images_for(
        &self,
        images: &[u8],
        batch: usize,
        size: usize,
        layout: ActivationLayout,
    ) -> Result<Tensor> {
        if layout == ActivationLayout::Nhwc && matches!(self.device, Device::Cpu) {
            return self.nhwc_host(images, batch, size);
        }
        let xs = self.images(images, batch, size)?;
        match layout {
            ActivationLayout::Nchw => Ok(xs),
            ActivationLayout::Nhwc => {
                let dtype = if self.device.is_cuda() {
                    DType::BF16
                } else {
                    DType::F32
                };
                xs.permute((0, 2, 3, 1))?.to_dtype(dtype)?.contiguous()
            }
        }
    }

    /// [`Feed::images_for`] channels-last on the CPU: the bytes normalised straight into the
    /// tensor's buffer, one pass over the batch on rayon's pool (the graph of [`Feed::images`]
    /// then two permutes would make five passes and four intermediate tensors); the same f32
    /// operations, so the same bits.
    fn nhwc_host(&self, images: &[u8], batch: usize, size: usize) -> Result<Tensor> {
        use rayon::prelude::*;
        let per_image = size * size * 3;
        let Some(bytes) = images.get(..batch * per_image) else {
            candle_core::bail!(
                "feed: {} bytes for {batch} images of {size}x{size}x3",
                images.len()
            )
        };
        let (mean, std) = self.norm.scaled();
        let mut out = vec![0f32; bytes.len()];
        out.par_chunks_mut(per_image.max(1))
            .zip(bytes.par_chunks(per_image.max(1)))
            .for_each(|(o, b)| {
                for (o, b) in o.chunks_exact_mut(3).zip(b.chunks_exact(3)) {
                    for c in 0..3 {
                        o[c] = (b[c] as f32 - mean[c]) / std[c];
                    }
                }
            });
        Tensor::from_vec(out, (batch, size, size, 3), &Device::Cpu)
    }

    /// Class labels as a u32 tensor of shape `[batch]`.
    pub fn labels(&self, labels: &[u32]) -> Result<Tensor> {
        Tensor::from_slice(labels, labels.len(), &self.device)
    }

    /// Dense (mixed, smoothed) targets, row-major `batch * classes` values
    /// ([`loader::mix::mixed_targets`]), as `[batch, classes]` f32.
    pub fn targets(&self, dense: &[f32], batch: usize, classes: usize) -> Result<Tensor> {
        Tensor::from_slice(dense, (batch, classes), &self.device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_like_timm_prefetch_loader() -> Result<()> {
        // Two 2x2 images with distinct values per pixel and channel.
        let (b, s) = (2usize, 2usize);
        let images: Vec<u8> = (0..b * s * s * 3).map(|i| (i * 21 % 256) as u8).collect();
        let feed = Feed::new(&Device::Cpu)?;
        let xs = feed.images(&images, b, s)?;
        assert_eq!(xs.dims(), &[b, 3, s, s]);
        // The channels-last one-pass path gives the same bits as the graph, permuted.
        let nhwc = feed.images_for(&images, b, s, ActivationLayout::Nhwc)?;
        assert_eq!(nhwc.dims(), &[b, s, s, 3]);
        let graph = xs.permute((0, 2, 3, 1))?.contiguous()?;
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            Ok(t.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|v| v.to_bits())
                .collect())
        };
        assert_eq!(bits(&nhwc)?, bits(&graph)?);
        let v = xs.flatten_all()?.to_vec1::<f32>()?;
        for n in 0..b {
            for c in 0..3 {
                for y in 0..s {
                    for x in 0..s {
                        let byte = images[((n * s + y) * s + x) * 3 + c] as f32;
                        let want = (byte - (IMAGENET_MEAN[c] * 255.0) as f32)
                            / (IMAGENET_STD[c] * 255.0) as f32;
                        let at = ((n * 3 + c) * s + y) * s + x;
                        assert_eq!(v[at].to_bits(), want.to_bits(), "n{n} c{c} y{y} x{x}");
                    }
                }
            }
        }
        Ok(())
    }

    /// A Vision Transformer's feed: 0.5 mean and std, so byte 0 is -1 and byte 255 is 1, on
    /// both paths.
    #[test]
    fn the_inception_statistics_map_bytes_to_minus_one_one() -> Result<()> {
        let feed = Feed::with_normalization(&Device::Cpu, Normalization::INCEPTION)?;
        // One pixel: R 0, G 255, B 0.
        let images = [0u8, 255, 0];
        for layout in [ActivationLayout::Nchw, ActivationLayout::Nhwc] {
            let v = feed
                .images_for(&images, 1, 1, layout)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            assert_eq!(v, [-1.0, 1.0, -1.0], "{layout:?}");
        }
        Ok(())
    }

    #[test]
    fn labels_and_targets_keep_their_values() -> Result<()> {
        let feed = Feed::new(&Device::Cpu)?;
        assert_eq!(feed.labels(&[3, 0, 7])?.to_vec1::<u32>()?, vec![3, 0, 7]);
        let dense = loader::mix::mixed_targets(&[1, 0], 3, 0.75, 0.0);
        let t = feed.targets(&dense, 2, 3)?;
        // Row i mixes its own label (weight 0.75) with the reversed batch's (0.25).
        assert_eq!(
            t.to_vec2::<f32>()?,
            vec![vec![0.25, 0.75, 0.0], vec![0.75, 0.25, 0.0]]
        );
        Ok(())
    }
}
