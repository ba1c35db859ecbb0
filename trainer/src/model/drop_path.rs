//! Stochastic depth (timm `DropPath`) with masks drawn on the host from an explicit seed.
//!
//! candle's CPU random numbers cannot be seeded per call, so the per-sample keep mask is drawn
//! with [`loader::rng::Rng`] and uploaded. Block `b` of a forward pass seeded with `seed` uses
//! `Rng::for_item(seed, &[b])`: one uniform per sample, kept when it is below `1 - drop_prob`.
//! The trainer derives `seed` from `(run seed, epoch, step)`.

use candle_core::{Result, Tensor};
use loader::rng::Rng;

/// Per-block drop probabilities, linear in the block index over the whole network, as timm's
/// `make_blocks`: block `k` of `num_blocks` gets `rate * k / (num_blocks - 1)` (the first block
/// 0, the last `rate`). A single block gets 0 (timm would divide by zero).
pub fn drop_path_rates(rate: f64, num_blocks: usize) -> Vec<f64> {
    if num_blocks < 2 {
        return vec![0.0; num_blocks];
    }
    (0..num_blocks)
        .map(|k| rate * k as f64 / (num_blocks - 1) as f64)
        .collect()
}

/// The per-sample scale of block `block_index`: `1 / (1 - drop_prob)` for kept samples and 0
/// for dropped ones (timm's `scale_by_keep`).
pub fn drop_path_scales(batch: usize, drop_prob: f64, seed: u64, block_index: usize) -> Vec<f64> {
    let keep = 1.0 - drop_prob;
    let mut rng = Rng::for_item(seed, &[block_index as u64]);
    (0..batch)
        .map(|_| if rng.f64() < keep { 1.0 / keep } else { 0.0 })
        .collect()
}

/// Applies stochastic depth to a residual branch: each sample is zeroed with probability
/// `drop_prob` and otherwise scaled by `1 / (1 - drop_prob)`. Identity when `drop_prob == 0`.
///
/// # Shapes
/// - `xs`: `[N, ...]`
/// - returns the shape of `xs`; the mask is `[N, 1, ..., 1]`.
pub fn drop_path(xs: &Tensor, drop_prob: f64, seed: u64, block_index: usize) -> Result<Tensor> {
    if drop_prob <= 0.0 {
        return Ok(xs.clone());
    }
    xs.broadcast_mul(&drop_path_mask(xs, drop_prob, seed, block_index)?)
}

/// The per-sample scales [`drop_path`] multiplies `xs` by, as a `[N, 1, ..., 1]` tensor in the
/// dtype and on the device of `xs`.
pub fn drop_path_mask(
    xs: &Tensor,
    drop_prob: f64,
    seed: u64,
    block_index: usize,
) -> Result<Tensor> {
    let n = xs.dim(0)?;
    let mut mask_shape = vec![1; xs.rank()];
    mask_shape[0] = n;
    Tensor::from_vec(
        drop_path_scales(n, drop_prob, seed, block_index),
        mask_shape,
        xs.device(),
    )?
    .to_dtype(xs.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn rates_are_linear_from_zero_to_rate() {
        let r = drop_path_rates(0.05, 16);
        assert_eq!(r[0], 0.0);
        assert!((r[15] - 0.05).abs() < 1e-15);
        assert!((r[5] - 0.05 * 5.0 / 15.0).abs() < 1e-15);
        assert_eq!(drop_path_rates(0.1, 1), [0.0]);
    }

    #[test]
    fn masks_are_seeded_per_block_and_keep_the_expected_fraction() -> Result<()> {
        let a = drop_path_scales(10_000, 0.25, 42, 3);
        assert_eq!(a, drop_path_scales(10_000, 0.25, 42, 3));
        assert_ne!(a, drop_path_scales(10_000, 0.25, 42, 4));
        assert_ne!(a, drop_path_scales(10_000, 0.25, 43, 3));
        let kept = a.iter().filter(|&&s| s > 0.0).count() as f64 / a.len() as f64;
        assert!((kept - 0.75).abs() < 0.02, "kept {kept}");
        assert!(a.iter().all(|&s| s == 0.0 || (s - 1.0 / 0.75).abs() < 1e-6));
        let xs = Tensor::ones((4, 2, 3, 3), DType::F32, &Device::Cpu)?;
        let ys = drop_path(&xs, 0.5, 1, 0)?;
        let per_sample = ys.sum((1, 2, 3))?.to_vec1::<f32>()?;
        for s in per_sample {
            assert!(s == 0.0 || s == 36.0, "{s}");
        }
        Ok(())
    }
}
