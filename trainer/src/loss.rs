//! Training and validation losses, as timm v0.5.4 defines them (`timm/loss/*.py`).
//!
//! Every loss is built from differentiable candle ops, so `loss.backward()` works. Inputs are
//! logits of shape `[batch, classes]`; the losses compute in the logits' dtype (f32 in training).
//!
//! * [`BinaryCrossEntropy`]: the RSB training loss (`timm/loss/binary_cross_entropy.py`).
//! * [`SoftTargetCrossEntropy`]: cross-entropy against dense (mixup/cutmix) targets.
//! * [`LabelSmoothingCrossEntropy`]: cross-entropy against class indices with label smoothing;
//!   with smoothing 0 it is plain cross-entropy, which is what timm validates with.

use candle_core::{DType, Result, Tensor, D};

/// The targets of a batch.
#[derive(Clone, Copy, Debug)]
pub enum Targets<'a> {
    /// Class indices, shape `[batch]`, an integer dtype (`u8`, `u32` or `i64`).
    Classes(&'a Tensor),
    /// Dense per-class targets, shape `[batch, classes]` (mixup/cutmix output, already smoothed).
    Dense(&'a Tensor),
}

/// Smoothed one-hot targets: `off = smoothing / classes` everywhere, `on = 1 - smoothing + off`
/// at the label (timm `mixup.one_hot` / `BinaryCrossEntropy`).
///
/// # Shapes
/// `labels: [batch]` (integer dtype) → `[batch, classes]` of `dtype`.
pub fn smoothed_one_hot(
    labels: &Tensor,
    num_classes: usize,
    smoothing: f64,
    dtype: DType,
) -> Result<Tensor> {
    let off = smoothing / num_classes as f64;
    let on = 1.0 - smoothing + off;
    let batch = labels.dim(0)?;
    let device = labels.device();
    let classes = Tensor::arange(0u32, num_classes as u32, device)?.unsqueeze(0)?;
    let labels = labels.to_dtype(DType::U32)?.reshape((batch, 1))?;
    let mask = labels.broadcast_eq(&classes)?;
    // `where_cond` keeps `on`/`off` bit-exact, as torch's `full(off).scatter_(on)` does.
    let on = Tensor::full(on, (batch, num_classes), device)?.to_dtype(dtype)?;
    let off = Tensor::full(off, (batch, num_classes), device)?.to_dtype(dtype)?;
    mask.where_cond(&on, &off)
}

/// Element-wise `binary_cross_entropy_with_logits`, in the overflow-free form
/// `max(x, 0) - x * y + log(1 + exp(-|x|))`, averaged over all elements.
///
/// # Shapes
/// `logits`, `targets`: the same shape; returns a scalar.
pub fn binary_cross_entropy_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let softplus_neg_abs = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    let per_element = ((logits.relu()? - (logits * targets)?)? + softplus_neg_abs)?;
    per_element.mean_all()
}

/// timm's `BinaryCrossEntropy` (v0.5.4, the RSB training loss).
///
/// 1. Targets: dense targets as given; class indices become [`smoothed_one_hot`] with `smoothing`.
///    (With mixup active timm smooths inside mixup, so dense targets are not smoothed again.)
/// 2. With `target_threshold = Some(thr)`: `y = (y > thr) as f32` (RSB: 0.2).
/// 3. `binary_cross_entropy_with_logits(x, y)`, **mean over batch × classes** (no `--bce-sum`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BinaryCrossEntropy {
    /// Label smoothing ε applied to class-index targets.
    pub smoothing: f64,
    /// Binarise targets at this value (`--bce-target-thresh`), or keep them soft.
    pub target_threshold: Option<f32>,
}

impl BinaryCrossEntropy {
    /// The dense targets the loss compares against, after smoothing and thresholding.
    ///
    /// # Shapes
    /// `logits: [batch, classes]` → `[batch, classes]`.
    pub fn dense_targets(&self, logits: &Tensor, targets: Targets<'_>) -> Result<Tensor> {
        let (_, num_classes) = logits.dims2()?;
        let ys = match targets {
            Targets::Dense(ys) => ys.to_dtype(logits.dtype())?,
            Targets::Classes(labels) => {
                smoothed_one_hot(labels, num_classes, self.smoothing, logits.dtype())?
            }
        };
        match self.target_threshold {
            None => Ok(ys),
            Some(thr) => ys.gt(thr as f64)?.to_dtype(logits.dtype()),
        }
    }

    /// The mean loss over all `batch × classes` elements (a scalar tensor).
    ///
    /// # Shapes
    /// `logits: [batch, classes]`; targets as [`Targets`] describes.
    pub fn forward(&self, logits: &Tensor, targets: Targets<'_>) -> Result<Tensor> {
        let ys = self.dense_targets(logits, targets)?;
        binary_cross_entropy_with_logits(logits, &ys.detach())
    }
}

/// timm's `SoftTargetCrossEntropy`: `mean_b sum_c(-y[b,c] * log_softmax(x)[b,c])`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SoftTargetCrossEntropy;

impl SoftTargetCrossEntropy {
    /// The mean loss over the batch.
    ///
    /// # Shapes
    /// `logits`, `targets`: `[batch, classes]`; returns a scalar.
    pub fn forward(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        let targets = targets.to_dtype(logits.dtype())?.detach();
        (targets * log_probs)?.sum(D::Minus1)?.neg()?.mean_all()
    }
}

/// timm's `LabelSmoothingCrossEntropy`:
/// `mean_b((1 - ε) * nll[b] + ε * mean_c(-log_softmax(x)[b, c]))`.
///
/// With `smoothing = 0` this is plain cross-entropy (timm's validation loss).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LabelSmoothingCrossEntropy {
    /// Label smoothing ε, in `[0, 1)`.
    pub smoothing: f64,
}

impl LabelSmoothingCrossEntropy {
    /// The mean loss over the batch.
    ///
    /// # Shapes
    /// `logits: [batch, classes]`, `labels: [batch]` (integer dtype); returns a scalar.
    pub fn forward(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let batch = labels.dim(0)?;
        let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        let index = labels.to_dtype(DType::U32)?.reshape((batch, 1))?;
        let nll = log_probs.gather(&index, D::Minus1)?.squeeze(1)?.neg()?;
        let smooth = log_probs.mean(D::Minus1)?.neg()?;
        let loss = ((nll * (1.0 - self.smoothing))? + (smooth * self.smoothing)?)?;
        loss.mean_all()
    }
}

/// The training loss a recipe selects (timm v0.5.4 `train.py`): BCE, or cross-entropy that takes
/// [`SoftTargetCrossEntropy`] for dense (mixed) targets and [`LabelSmoothingCrossEntropy`] for
/// class indices.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TrainLoss {
    /// [`BinaryCrossEntropy`] (RSB).
    Bce(BinaryCrossEntropy),
    /// Cross-entropy; `smoothing` applies to class-index targets only (mixed targets arrive
    /// smoothed).
    Ce {
        /// Label smoothing ε for class-index targets.
        smoothing: f64,
    },
}

impl TrainLoss {
    /// The mean loss of a batch (a scalar tensor).
    ///
    /// # Shapes
    /// `logits: [batch, classes]`; targets as [`Targets`] describes.
    pub fn forward(&self, logits: &Tensor, targets: Targets<'_>) -> Result<Tensor> {
        match (self, targets) {
            (Self::Bce(bce), targets) => bce.forward(logits, targets),
            (Self::Ce { .. }, Targets::Dense(ys)) => SoftTargetCrossEntropy.forward(logits, ys),
            (Self::Ce { smoothing }, Targets::Classes(labels)) => LabelSmoothingCrossEntropy {
                smoothing: *smoothing,
            }
            .forward(logits, labels),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn smoothed_one_hot_values() {
        let labels = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
        let t = smoothed_one_hot(&labels, 4, 0.1, DType::F32).unwrap();
        let v = t.to_vec2::<f32>().unwrap();
        let off = (0.1f64 / 4.0) as f32;
        let on = (1.0 - 0.1 + 0.1 / 4.0) as f32;
        assert_eq!(v, vec![vec![off, off, on, off], vec![on, off, off, off]]);
    }

    #[test]
    fn bce_is_stable_for_large_logits() {
        let x = Tensor::new(&[[1000f32, -1000.0]], &Device::Cpu).unwrap();
        let y = Tensor::new(&[[1f32, 0.0]], &Device::Cpu).unwrap();
        let l = binary_cross_entropy_with_logits(&x, &y).unwrap();
        assert_eq!(l.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn bce_gradient_at_zero_is_sigmoid_minus_target() {
        // relu and |x| have kinks at 0; candle differentiates both as the x >= 0 branch, which
        // makes the kinks cancel: d/dx = 1 - y - 0.5 = sigmoid(0) - y.
        let x = candle_core::Var::zeros((1, 2), DType::F32, &Device::Cpu).unwrap();
        let y = Tensor::new(&[[1f32, 0.0]], &Device::Cpu).unwrap();
        let l = binary_cross_entropy_with_logits(x.as_tensor(), &y).unwrap();
        let g = l.backward().unwrap();
        let g = g.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        // Mean over 2 elements halves the per-element gradient.
        assert_eq!(g, vec![vec![-0.25, 0.25]]);
    }

    #[test]
    fn threshold_binarises_smoothed_targets() {
        let x = Tensor::zeros((1, 3), DType::F32, &Device::Cpu).unwrap();
        let labels = Tensor::new(&[1u32], &Device::Cpu).unwrap();
        let bce = BinaryCrossEntropy {
            smoothing: 0.1,
            target_threshold: Some(0.2),
        };
        let y = bce.dense_targets(&x, Targets::Classes(&labels)).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![0.0, 1.0, 0.0]]);
    }
}
