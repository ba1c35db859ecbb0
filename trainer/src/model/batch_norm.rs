//! `BatchNorm2d` with PyTorch's training semantics.
//!
//! candle-nn's `BatchNorm` trains too, but it copies the input into a `[C, N*H*W]` layout and
//! hides which of its tensors are parameters. This one reduces over `(N, H, W)` in place, and its
//! running statistics are [`Var`]s updated in place, so a model built on a `VarMap` checkpoints
//! them with everything else while [`crate::model::Param`] keeps them out of the optimizer.

use candle_core::{bail, DType, Result, Tensor, Var};
use candle_nn::ModuleT;

/// PyTorch's default `momentum`: `running = (1 - m) * running + m * batch_stat`.
pub const BN_MOMENTUM: f64 = 0.1;
/// PyTorch's default `eps`, added to the variance before the square root.
pub const BN_EPS: f64 = 1e-5;

/// Batch normalisation over the channel dimension of `[N, C, H, W]` tensors.
///
/// Train mode normalises with the batch mean and the biased batch variance, and moves the
/// running mean and the *unbiased* running variance (`n / (n - 1)`, `n = N * H * W`) towards
/// them with [`BN_MOMENTUM`]. Eval mode uses the running statistics. timm's
/// `num_batches_tracked` buffer only matters when `momentum` is `None`, so it is not kept.
#[derive(Clone, Debug)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
}

impl BatchNorm2d {
    /// A batch norm from its four tensors, each of shape `[C]`. The running statistics become
    /// [`Var`]s: when they already are variables (a `VarMap`-backed `VarBuilder`) the updates
    /// land in the map; otherwise they are private copies.
    pub fn new(
        weight: Tensor,
        bias: Tensor,
        running_mean: &Tensor,
        running_var: &Tensor,
    ) -> Result<Self> {
        let c = weight.dims1()?;
        for (name, t) in [
            ("bias", &bias),
            ("running_mean", running_mean),
            ("running_var", running_var),
        ] {
            if t.dims() != [c] {
                bail!(
                    "batch norm: {name} has shape {:?}, expected [{c}]",
                    t.dims()
                )
            }
        }
        Ok(Self {
            weight,
            bias,
            running_mean: Var::from_tensor(running_mean)?,
            running_var: Var::from_tensor(running_var)?,
            eps: BN_EPS,
            momentum: BN_MOMENTUM,
        })
    }

    /// The running mean, `[C]`.
    pub fn running_mean(&self) -> &Var {
        &self.running_mean
    }

    /// The running (unbiased) variance, `[C]`.
    pub fn running_var(&self) -> &Var {
        &self.running_var
    }

    /// The scale (gamma).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The shift (beta).
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// Epsilon added to the variance.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// Momentum of the running statistics (PyTorch convention: weight of the new batch).
    pub fn momentum(&self) -> f64 {
        self.momentum
    }

    /// The evaluation transform folded into one f32 `scale` and `shift` per channel:
    /// `gamma / sqrt(running_var + eps)` and `beta - running_mean * scale`.
    pub fn folded_scale_shift(&self) -> Result<(Tensor, Tensor)> {
        let f = DType::F32;
        let rm = self.running_mean.as_detached_tensor().to_dtype(f)?;
        let rv = self.running_var.as_detached_tensor().to_dtype(f)?;
        let scale = (rv + self.eps)?
            .sqrt()?
            .recip()?
            .mul(&self.weight.detach().to_dtype(f)?)?;
        let shift = self.bias.detach().to_dtype(f)?.sub(&rm.mul(&scale)?)?;
        Ok((scale, shift))
    }

    fn channel_view(t: &Tensor, c: usize) -> Result<Tensor> {
        t.reshape((1, c, 1, 1))
    }

    fn forward_train(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        if matches!(dtype, DType::BF16 | DType::F16) {
            // Batch statistics of half-precision activations are computed in f32.
            let ys = self.forward_train_full(&xs.to_dtype(DType::F32)?)?;
            return ys.to_dtype(dtype);
        }
        self.forward_train_full(xs)
    }

    /// The training normalisation on batch statistics with the given affine parameters,
    /// without touching the running statistics: `(ys, batch mean, biased batch variance)`.
    fn normalize_batch(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (n, c, h, w) = xs.dims4()?;
        if n * h * w < 2 {
            bail!(
                "batch norm: training needs more than one value per channel, got input {:?}",
                xs.dims()
            )
        }
        let mean = xs.mean_keepdim((0, 2, 3))?;
        let centred = xs.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim((0, 2, 3))?;
        let scale = (var.clone() + self.eps)?
            .sqrt()?
            .recip()?
            .broadcast_mul(&Self::channel_view(&weight.to_dtype(xs.dtype())?, c)?)?;
        let ys = centred
            .broadcast_mul(&scale)?
            .broadcast_add(&Self::channel_view(&bias.to_dtype(xs.dtype())?, c)?)?;
        Ok((ys, mean, var))
    }

    /// The training forward's output for `weight` and `bias` in place of this layer's own
    /// (half-precision input normalised in f32), with the running statistics left alone: the
    /// function whose vector-Jacobian product is the CPU reference of the explicit backward.
    ///
    /// # Shapes
    /// - `xs`: `[N, C, H, W]`; returns the same
    pub fn train_output_with(&self, xs: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        if matches!(dtype, DType::BF16 | DType::F16) {
            let (ys, _, _) = self.normalize_batch(&xs.to_dtype(DType::F32)?, weight, bias)?;
            return ys.to_dtype(dtype);
        }
        Ok(self.normalize_batch(xs, weight, bias)?.0)
    }

    fn forward_train_full(&self, xs: &Tensor) -> Result<Tensor> {
        let (n, _, h, w) = xs.dims4()?;
        let count = n * h * w;
        let (ys, mean, var) = self.normalize_batch(xs, &self.weight, &self.bias)?;

        let m = self.momentum;
        let stat_dtype = self.running_mean.dtype();
        let batch_mean = mean.detach().flatten_all()?.to_dtype(stat_dtype)?;
        let unbiased = (var.detach().flatten_all()? * (count as f64 / (count - 1) as f64))?
            .to_dtype(stat_dtype)?;
        let rm = ((self.running_mean.as_detached_tensor() * (1.0 - m))? + (batch_mean * m)?)?;
        let rv = ((self.running_var.as_detached_tensor() * (1.0 - m))? + (unbiased * m)?)?;
        self.running_mean.set(&rm)?;
        self.running_var.set(&rv)?;
        Ok(ys)
    }

    fn forward_eval(&self, xs: &Tensor) -> Result<Tensor> {
        let c = xs.dim(1)?;
        let dtype = xs.dtype();
        // Fold the statistics into one scale and shift per channel, in f32 at least.
        let fold = if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let rm = self.running_mean.as_detached_tensor().to_dtype(fold)?;
        let rv = self.running_var.as_detached_tensor().to_dtype(fold)?;
        let scale = (rv + self.eps)?
            .sqrt()?
            .recip()?
            .mul(&self.weight.to_dtype(fold)?)?;
        let shift = self.bias.to_dtype(fold)?.sub(&rm.mul(&scale)?)?;
        let scale = Self::channel_view(&scale.to_dtype(dtype)?, c)?;
        let shift = Self::channel_view(&shift.to_dtype(dtype)?, c)?;
        xs.broadcast_mul(&scale)?.broadcast_add(&shift)
    }
}

impl ModuleT for BatchNorm2d {
    /// # Shapes
    /// - `xs`: `[N, C, H, W]`
    /// - returns `[N, C, H, W]`
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            self.forward_train(xs)
        } else {
            self.forward_eval(xs)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn bn(c: usize) -> Result<BatchNorm2d> {
        let dev = Device::Cpu;
        let w = Var::from_vec((0..c).map(|i| 1.0 + 0.5 * i as f32).collect(), c, &dev)?;
        let b = Var::from_vec((0..c).map(|i| 0.25 * i as f32).collect(), c, &dev)?;
        BatchNorm2d::new(
            w.as_tensor().clone(),
            b.as_tensor().clone(),
            &Tensor::zeros(c, DType::F32, &dev)?,
            &Tensor::ones(c, DType::F32, &dev)?,
        )
    }

    #[test]
    fn train_mode_matches_hand_computation() -> Result<()> {
        let dev = Device::Cpu;
        let (n, c, h, w) = (2, 3, 2, 2);
        let data: Vec<f32> = (0..n * c * h * w)
            .map(|i| ((i * 7) % 11) as f32 - 4.0)
            .collect();
        let xs = Tensor::from_vec(data.clone(), (n, c, h, w), &dev)?;
        let norm = bn(c)?;
        let ys = norm.forward_t(&xs, true)?;
        assert_eq!(ys.dims(), &[n, c, h, w]);
        let yv = ys.flatten_all()?.to_vec1::<f32>()?;
        for ch in 0..c {
            let vals: Vec<f64> = (0..n)
                .flat_map(|b| (0..h * w).map(move |p| (b, p)))
                .map(|(b, p)| data[b * c * h * w + ch * h * w + p] as f64)
                .collect();
            let cnt = vals.len() as f64;
            let mean = vals.iter().sum::<f64>() / cnt;
            let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / cnt;
            let (g, beta) = (1.0 + 0.5 * ch as f64, 0.25 * ch as f64);
            for b in 0..n {
                for p in 0..h * w {
                    let i = b * c * h * w + ch * h * w + p;
                    let want = (data[i] as f64 - mean) / (var + BN_EPS).sqrt() * g + beta;
                    assert!(
                        (yv[i] as f64 - want).abs() < 1e-5,
                        "ch {ch}: {} vs {want}",
                        yv[i]
                    );
                }
            }
            let rm = norm.running_mean().to_vec1::<f32>()?[ch] as f64;
            let rv = norm.running_var().to_vec1::<f32>()?[ch] as f64;
            assert!((rm - 0.1 * mean).abs() < 1e-6);
            assert!((rv - (0.9 + 0.1 * var * cnt / (cnt - 1.0))).abs() < 1e-5);
        }
        // Eval with the updated running statistics.
        let ye = norm
            .forward_t(&xs, false)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let rm = norm.running_mean().to_vec1::<f32>()?;
        let rv = norm.running_var().to_vec1::<f32>()?;
        let i = c * h * w + h * w + 1; // batch 1, channel 1
        let want = (data[i] - rm[1]) / (rv[1] + BN_EPS as f32).sqrt() * 1.5 + 0.25;
        assert!((ye[i] - want).abs() < 1e-5);
        Ok(())
    }

    #[test]
    fn half_precision_inputs_use_f32_statistics() -> Result<()> {
        let dev = Device::Cpu;
        let data: Vec<f32> = (0..2 * 3 * 4 * 4)
            .map(|i| ((i * 5) % 13) as f32 * 0.25)
            .collect();
        let xs = Tensor::from_vec(data, (2, 3, 4, 4), &dev)?;
        let want = bn(3)?.forward_t(&xs, true)?;
        let got = bn(3)?.forward_t(&xs.to_dtype(DType::BF16)?, true)?;
        assert_eq!(got.dtype(), DType::BF16);
        let diff = (got.to_dtype(DType::F32)? - want)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 0.05, "bf16 batch norm differs by {diff}");
        Ok(())
    }

    #[test]
    fn one_value_per_channel_is_an_error() -> Result<()> {
        let xs = Tensor::zeros((1, 2, 1, 1), DType::F32, &Device::Cpu)?;
        let err = bn(2)?.forward_t(&xs, true).unwrap_err().to_string();
        assert!(err.contains("more than one value per channel"), "{err}");
        Ok(())
    }
}
