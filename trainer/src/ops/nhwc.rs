//! Channels-last (`[N, H, W, C]`) layer functions: the layers of the fast CUDA path, each with
//! a CPU reference built from the NCHW ops.
//!
//! On a CUDA device with bf16 activations each function runs the fused custom op of
//! [`crate::cuda`] (cuDNN convolutions, BatchNorm + ReLU, max-pool, global average pool,
//! add + ReLU). Everywhere else it permutes to NCHW, runs the reference op and permutes back, so
//! a channels-last network on the CPU computes exactly what the NCHW network computes: the tests
//! check this, and the GPU tests check each CUDA op against the same references.
//!
//! Weights stay in their PyTorch layout and dtype (f32 masters, OIHW): [`conv2d`] casts and
//! permutes them to bf16 KRSC in one pass per call, and candle's autograd turns the gradient
//! back into an f32 OIHW gradient for the optimizer.

use candle_core::{DType, Result, Tensor};
use candle_nn::ModuleT;

use crate::model::BatchNorm2d;

/// True when `x` takes the fused CUDA ops (a CUDA tensor in bf16).
pub fn is_fast(x: &Tensor) -> bool {
    cfg!(feature = "cuda") && x.device().is_cuda() && x.dtype() == DType::BF16
}

fn to_nchw(x: &Tensor) -> Result<Tensor> {
    x.permute((0, 3, 1, 2))?.contiguous()
}

fn to_nhwc(x: &Tensor) -> Result<Tensor> {
    x.permute((0, 2, 3, 1))?.contiguous()
}

/// 2-D convolution, no bias.
///
/// # Shapes
/// - `x`: `[N, H, W, C]`; `weight`: `[K, C / groups, R, R]` (PyTorch OIHW, any float dtype)
/// - returns `[N, OH, OW, K]` in the dtype of `x`
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
    groups: usize,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if is_fast(x) {
        let w = weight
            .permute((0, 2, 3, 1))?
            .to_dtype(DType::BF16)?
            .contiguous()?;
        let op = crate::cuda::conv::Conv2dNhwc {
            stride,
            pad: padding,
            groups,
        };
        return x.contiguous()?.apply_op2(&w, op);
    }
    let w = weight.to_dtype(x.dtype())?;
    to_nhwc(&to_nchw(x)?.conv2d(&w, padding, stride, 1, groups)?)
}

/// BatchNorm (training: batch statistics, running statistics updated; evaluation: running
/// statistics), then ReLU when `relu`.
///
/// # Shapes
/// - `x`: `[N, H, W, C]`; returns the same shape and dtype
pub fn batch_norm(x: &Tensor, bn: &BatchNorm2d, train: bool, relu: bool) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if is_fast(x) {
        use crate::cuda::bn::{BatchNormApply, BatchNormTrain};
        let x = x.contiguous()?;
        let (gamma, beta) = (
            bn.weight().to_dtype(DType::F32)?,
            bn.bias().to_dtype(DType::F32)?,
        );
        if train {
            let op = BatchNormTrain::new(
                bn.running_mean().as_tensor().clone(),
                bn.running_var().as_tensor().clone(),
                bn.eps(),
                bn.momentum(),
                relu,
            );
            return x.apply_op3(&gamma, &beta, op);
        }
        let (scale, shift) = bn.folded_scale_shift()?;
        return x.apply_op3_no_bwd(&scale, &shift, &BatchNormApply { relu });
    }
    let y = bn.forward_t(&to_nchw(x)?, train)?;
    let y = if relu { y.relu()? } else { y };
    to_nhwc(&y)
}

/// Max-pool with a `kernel x kernel` window (padding acts as `-inf`).
///
/// # Shapes
/// - `x`: `[N, H, W, C]`; returns `[N, OH, OW, C]`
pub fn max_pool(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if is_fast(x) {
        let op = crate::cuda::pool::MaxPoolNhwc::new(kernel, stride, padding)?;
        return x.contiguous()?.apply_op1(op);
    }
    to_nhwc(&super::max_pool2d(&to_nchw(x)?, kernel, stride, padding)?)
}

/// Global average pool to f32 features.
///
/// # Shapes
/// - `x`: `[N, H, W, C]`; returns `[N, C]` f32
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if is_fast(x) {
        return x
            .contiguous()?
            .apply_op1(crate::cuda::pool::GlobalAvgPoolNhwc);
    }
    let dt = if x.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    x.to_dtype(dt)?.mean((1, 2))
}

/// `relu(a + b)` (the end of a residual block).
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if is_fast(a) && b.dtype() == DType::BF16 {
        return a
            .contiguous()?
            .apply_op2(&b.contiguous()?, crate::cuda::pool::AddRelu);
    }
    (a + b)?.relu()
}

/// ResNet-D's 2x2 ceil-mode average pool of the shortcut (reference path on every device).
pub fn avg_pool2d_ceil(x: &Tensor) -> Result<Tensor> {
    to_nhwc(&super::avg_pool2d_ceil(&to_nchw(x)?)?)
}
