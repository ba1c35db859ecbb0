//! Channels-last (`[N, H, W, C]`) layer functions: the layers of the fast path, on CUDA and on
//! the CPU, each with a reference built from candle's NCHW ops ([`reference`]).
//!
//! On a CUDA device with bf16 activations each function runs the fused custom op of
//! [`crate::cuda`] (cuDNN convolutions, BatchNorm + ReLU, max-pool, global average pool,
//! add + ReLU). With f32 activations on the CPU it runs the kernels of [`crate::ops::cpu`]
//! (tiled GEMM convolutions, fused BatchNorm + ReLU, ...; multi-threaded, deterministic for any
//! thread count). Anything else (f64, for instance) permutes to NCHW, runs the reference op and
//! permutes back. The tests check that a channels-last network computes what the NCHW network
//! computes, and the GPU tests and the kernel emulation check each CUDA op against the
//! references.
//!
//! Weights stay in their PyTorch layout and dtype (f32 masters, OIHW): [`conv2d`] converts them
//! per call (bf16 KRSC for cuDNN, RSCK for the CPU GEMMs), and the gradient goes back to an f32
//! OIHW gradient for the optimizer (through candle's autograd, or in [`conv2d_backward`]).
//!
//! The `*_train` / `*_backward` pairs are the same layers for the explicit training pass
//! ([`crate::model::ResNet::forward_train_pass`]): the forward returns what its backward needs,
//! and the backward returns the input and parameter gradients without going through candle's
//! graph. On CUDA and the CPU they call the same kernels as the custom ops' backward (so the
//! explicit pass and the graph compute the same values); elsewhere the backward is the
//! vector-Jacobian product of the reference forward, taken by candle's autograd on fresh
//! variables.

use candle_core::{DType, Result, Tensor, Var};

use crate::model::BatchNorm2d;
use crate::ops::{cpu, Activation};

/// True when `x` takes the fused CUDA ops (a CUDA tensor in bf16).
pub fn is_cuda_fast(x: &Tensor) -> bool {
    cfg!(feature = "cuda") && x.device().is_cuda() && x.dtype() == DType::BF16
}

/// True when `x` takes the CPU kernels (an f32 tensor on the CPU).
pub fn is_cpu_fast(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// True when `x` takes a fast path (CUDA bf16 or CPU f32): the explicit backward then has real
/// backward kernels.
pub fn is_fast(x: &Tensor) -> bool {
    is_cuda_fast(x) || is_cpu_fast(x)
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
    if is_cuda_fast(x) {
        let (w, op) = cudnn_conv(weight, stride, padding, groups)?;
        return x.contiguous()?.apply_op2(&w, op);
    }
    if is_cpu_fast(x) && weight.dtype() == DType::F32 {
        let op = cpu::Conv2dCpu {
            stride,
            pad: padding,
            groups,
        };
        return x.contiguous()?.apply_op2(&weight.contiguous()?, op);
    }
    reference::conv2d(x, weight, stride, padding, groups)
}

/// The fast path's filter (the OIHW weight cast and permuted to bf16 KRSC in one pass) and
/// cuDNN convolution op.
#[cfg(feature = "cuda")]
fn cudnn_conv(
    weight: &Tensor,
    stride: usize,
    padding: usize,
    groups: usize,
) -> Result<(Tensor, crate::cuda::conv::Conv2dNhwc)> {
    let w = weight
        .permute((0, 2, 3, 1))?
        .to_dtype(DType::BF16)?
        .contiguous()?;
    let op = crate::cuda::conv::Conv2dNhwc {
        stride,
        pad: padding,
        groups,
    };
    Ok((w, op))
}

/// BatchNorm (training: batch statistics, running statistics updated; evaluation: running
/// statistics), then ReLU when `relu`.
///
/// # Shapes
/// - `x`: `[N, H, W, C]`; returns the same shape and dtype
pub fn batch_norm(x: &Tensor, bn: &BatchNorm2d, train: bool, relu: bool) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if is_cuda_fast(x) {
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
    if is_cpu_fast(x) && bn.weight().dtype() == DType::F32 {
        if !train {
            return cpu::batch_norm_eval(x, bn, relu);
        }
        let op = cpu::BatchNormTrainCpu::new(bn, relu);
        return x.contiguous()?.apply_op3(bn.weight(), bn.bias(), op);
    }
    reference::batch_norm(x, bn, train, relu)
}

/// Max-pool with a `kernel x kernel` window (padding acts as `-inf`).
///
/// # Shapes
/// - `x`: `[N, H, W, C]`; returns `[N, OH, OW, C]`
pub fn max_pool(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if is_cuda_fast(x) {
        let op = crate::cuda::pool::MaxPoolNhwc::new(kernel, stride, padding)?;
        return x.contiguous()?.apply_op1(op);
    }
    if is_cpu_fast(x) {
        let op = cpu::MaxPoolCpu::new(kernel, stride, padding);
        return x.contiguous()?.apply_op1(op);
    }
    reference::max_pool(x, kernel, stride, padding)
}

/// Global average pool to f32 features.
///
/// # Shapes
/// - `x`: `[N, H, W, C]`; returns `[N, C]` f32
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if is_cuda_fast(x) {
        return x
            .contiguous()?
            .apply_op1(crate::cuda::pool::GlobalAvgPoolNhwc);
    }
    if is_cpu_fast(x) {
        return x.contiguous()?.apply_op1(cpu::GlobalAvgPoolCpu);
    }
    reference::global_avg_pool(x)
}

/// The evaluation forward of a conv followed by BatchNorm on running statistics, then
/// `residual` added (the block's shortcut), then `act`: on the CPU fast path one convolution
/// with the BatchNorm folded into the filter and the rest applied to each output tile while it
/// is in cache; elsewhere [`conv2d`], [`batch_norm`], the add and the activation.
#[allow(clippy::too_many_arguments)]
pub fn conv_bn_eval(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
    groups: usize,
    bn: &BatchNorm2d,
    act: Activation,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    if is_cpu_fast(x) && weight.dtype() == DType::F32 && bn.weight().dtype() == DType::F32 {
        return cpu::conv_bn_eval(x, weight, stride, padding, groups, bn, act, residual);
    }
    let y = conv2d(x, weight, stride, padding, groups)?;
    let relu = act == Activation::Relu;
    let y = match residual {
        None => batch_norm(&y, bn, false, relu)?,
        Some(r) if relu => add_relu(&batch_norm(&y, bn, false, false)?, r)?,
        Some(r) => (batch_norm(&y, bn, false, false)? + r)?,
    };
    match act {
        Activation::Silu => crate::ops::silu(&y),
        _ => Ok(y),
    }
}

/// `relu(a + b)` (the end of a residual block).
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if is_cuda_fast(a) && b.dtype() == DType::BF16 {
        return a
            .contiguous()?
            .apply_op2(&b.contiguous()?, crate::cuda::pool::AddRelu);
    }
    if is_cpu_fast(a) && b.dtype() == DType::F32 {
        return a.contiguous()?.apply_op2(&b.contiguous()?, cpu::AddReluCpu);
    }
    reference::add_relu(a, b)
}

/// Channel attention's gate (squeeze-excite, ECA): every pixel of sample `b` multiplied by
/// `gate[b]`, channel by channel. One pass each way on the fast paths (CUDA bf16 with a bf16
/// gate, CPU f32 with an f32 gate; the gate's gradient summed per sample, not through candle's
/// strided reduce); elsewhere a broadcast multiply.
///
/// # Shapes
/// - `x`: `[N, H, W, C]`; `gate`: `[N, C]`; returns `[N, H, W, C]` in the dtype of `x`
pub fn channel_scale(x: &Tensor, gate: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if is_cuda_fast(x) && gate.dtype() == DType::BF16 {
        return x
            .contiguous()?
            .apply_op2(&gate.contiguous()?, crate::cuda::pool::ChannelScale);
    }
    if is_cpu_fast(x) && gate.dtype() == DType::F32 {
        return x
            .contiguous()?
            .apply_op2(&gate.contiguous()?, cpu::ChannelScaleCpu);
    }
    let (n, _, _, c) = x.dims4()?;
    x.broadcast_mul(&gate.to_dtype(x.dtype())?.reshape((n, 1, 1, c))?)
}

/// The layers from candle's NCHW ops between permutes: the fallback of every function here,
/// and the reference the tests (and the CUDA kernel emulation) compare the fast paths with.
pub mod reference {
    use candle_core::{DType, Result, Tensor};
    use candle_nn::ModuleT;

    use super::{to_nchw, to_nhwc};
    use crate::model::BatchNorm2d;

    /// [`super::conv2d`] through candle's NCHW convolution.
    pub fn conv2d(
        x: &Tensor,
        weight: &Tensor,
        stride: usize,
        padding: usize,
        groups: usize,
    ) -> Result<Tensor> {
        let w = weight.to_dtype(x.dtype())?;
        to_nhwc(&to_nchw(x)?.conv2d(&w, padding, stride, 1, groups)?)
    }

    /// [`super::batch_norm`] through candle-nn's BatchNorm.
    pub fn batch_norm(x: &Tensor, bn: &BatchNorm2d, train: bool, relu: bool) -> Result<Tensor> {
        let y = bn.forward_t(&to_nchw(x)?, train)?;
        let y = if relu { y.relu()? } else { y };
        to_nhwc(&y)
    }

    /// [`super::max_pool`] through the NCHW max-pool op.
    pub fn max_pool(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
        to_nhwc(&crate::ops::max_pool2d(
            &to_nchw(x)?,
            kernel,
            stride,
            padding,
        )?)
    }

    /// [`super::global_avg_pool`] as a mean.
    pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
        let dt = if x.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        x.to_dtype(dt)?.mean((1, 2))
    }

    /// [`super::add_relu`] as two ops.
    pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
        (a + b)?.relu()
    }
}

/// ResNet-D's 2x2 ceil-mode average pool of the shortcut: a CPU kernel each way for f32 on the
/// CPU, candle's NCHW pool between permutes elsewhere.
pub fn avg_pool2d_ceil(x: &Tensor) -> Result<Tensor> {
    if is_cpu_fast(x) {
        return x.contiguous()?.apply_op1(cpu::AvgPool2CeilCpu);
    }
    to_nhwc(&crate::ops::avg_pool2d_ceil(&to_nchw(x)?)?)
}

/// `a + b` for the explicit pass (no graph): one parallel pass on the CPU fast path (candle's
/// add runs on its own spinning thread pool beside rayon's), candle's add elsewhere.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if is_cpu_fast(a) && b.dtype() == DType::F32 && a.dims() == b.dims() {
        let y = cpu::with_f32(a, |av| cpu::with_f32(b, |bv| cpu::kernels::add(av, bv)))??;
        return Tensor::from_vec(y, a.shape(), a.device());
    }
    a + b
}

/// The input gradient of [`crate::ops::silu`] at `x`: one pass on the fast paths (CUDA bf16, CPU f32).
pub fn silu_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if is_cuda_fast(x) {
        return crate::cuda::pool::silu_backward(x, dy);
    }
    if is_cpu_fast(x) {
        return cpu::silu_backward(x, dy);
    }
    let g = vjp(&[x], dy, |t| crate::ops::silu(&t[0]))?;
    Ok(g.into_iter().next().expect("one gradient"))
}

/// The gradients of [`channel_scale`] at `(x, gate)`: `(dx, dgate)` (`dgate` `[N, C]` in the
/// gate's dtype).
pub fn channel_scale_backward(x: &Tensor, gate: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if is_cuda_fast(x) && gate.dtype() == DType::BF16 {
        return crate::cuda::pool::channel_scale_backward(x, gate, dy);
    }
    if is_cpu_fast(x) && gate.dtype() == DType::F32 {
        return cpu::channel_scale_backward(x, gate, dy);
    }
    let mut g = vjp(&[x, gate], dy, |t| channel_scale(&t[0], &t[1]))?.into_iter();
    Ok((g.next().expect("dx"), g.next().expect("dgate")))
}

/// The input gradient of [`avg_pool2d_ceil`] at `x`.
pub fn avg_pool2d_ceil_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    if is_cpu_fast(x) {
        let (n, h, w, c) = x.dims4()?;
        return cpu::avg_pool2_ceil_backward((n, h, w, c), dy);
    }
    let g = vjp(&[x], dy, |t| avg_pool2d_ceil(&t[0]))?;
    Ok(g.into_iter().next().expect("one gradient"))
}

/// The vector-Jacobian product of `f` at `inputs` for the output gradient `dy`: candle's
/// autograd on fresh variables (the CPU reference of the explicit backward). An input `f` does
/// not depend on gets a zero gradient.
fn vjp(
    inputs: &[&Tensor],
    dy: &Tensor,
    f: impl FnOnce(&[Tensor]) -> Result<Tensor>,
) -> Result<Vec<Tensor>> {
    let vars = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.detach()))
        .collect::<Result<Vec<_>>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts)?;
    let grads = (y * dy.detach())?.sum_all()?.backward()?;
    vars.iter()
        .map(|v| match grads.get(v.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => v.as_tensor().zeros_like(),
        })
        .collect()
}

/// What [`conv2d_backward`] needs from [`conv2d_train`].
#[derive(Debug)]
pub struct ConvSaved {
    x: Tensor,
    /// The filter as the forward ran it: bf16 KRSC on the fast path, the weight itself elsewhere.
    w: Tensor,
    weight_dtype: DType,
    stride: usize,
    padding: usize,
    groups: usize,
}

/// [`conv2d`] for the explicit training pass: no graph, and what the backward needs.
pub fn conv2d_train(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
    groups: usize,
) -> Result<(Tensor, ConvSaved)> {
    let weight = weight.detach();
    let weight_dtype = weight.dtype();
    #[cfg(feature = "cuda")]
    if is_cuda_fast(x) {
        let (w, op) = cudnn_conv(&weight, stride, padding, groups)?;
        let x = x.contiguous()?;
        let y = x.apply_op2_no_bwd(&w, &op)?;
        let saved = ConvSaved {
            x,
            w,
            weight_dtype,
            stride,
            padding,
            groups,
        };
        return Ok((y, saved));
    }
    let y = if is_cpu_fast(x) && weight_dtype == DType::F32 {
        cpu::conv2d(x, &weight, stride, padding, groups)?
    } else {
        conv2d(x, &weight, stride, padding, groups)?
    };
    let saved = ConvSaved {
        x: x.clone(),
        w: weight,
        weight_dtype,
        stride,
        padding,
        groups,
    };
    Ok((y, saved))
}

/// The gradients of a [`conv2d_train`]: `dx` (only when `need_dx`; the network's first conv
/// skips it) and `dw` in the weight's layout and dtype (OIHW, f32 masters).
pub fn conv2d_backward(
    saved: &ConvSaved,
    dy: &Tensor,
    need_dx: bool,
) -> Result<(Option<Tensor>, Tensor)> {
    let (stride, padding, groups) = (saved.stride, saved.padding, saved.groups);
    #[cfg(feature = "cuda")]
    if is_cuda_fast(&saved.x) {
        let op = crate::cuda::conv::Conv2dNhwc {
            stride,
            pad: padding,
            groups,
        };
        let dy = dy.contiguous()?;
        let dx = if need_dx {
            Some(op.backward_data(&dy, &saved.w, saved.x.dims4()?)?)
        } else {
            None
        };
        let dw = op.backward_filter(&saved.x, &dy, saved.w.dims4()?)?;
        // KRSC bf16 -> OIHW in the master dtype, in one strided pass.
        let dw = dw.permute((0, 3, 1, 2))?.to_dtype(saved.weight_dtype)?;
        return Ok((dx, dw));
    }
    if is_cpu_fast(&saved.x) && saved.weight_dtype == DType::F32 {
        return cpu::conv2d_backward(&saved.x, &saved.w, dy, stride, padding, groups, need_dx);
    }
    let g = vjp(&[&saved.x, &saved.w], dy, |t| {
        conv2d(&t[0], &t[1], stride, padding, groups)
    })?;
    let mut g = g.into_iter();
    let (dx, dw) = (g.next(), g.next());
    let dw = dw.expect("two gradients").to_dtype(saved.weight_dtype)?;
    Ok((if need_dx { dx } else { None }, dw))
}

/// What [`batch_norm_backward`] needs from [`batch_norm_train`].
#[derive(Debug)]
pub struct BnSaved {
    x: Tensor,
    relu: bool,
    /// The fast path's op (holding the batch statistics), f32 gamma, and the output when a
    /// ReLU follows (its mask; without one the backward never reads the output, so the tensor
    /// is not kept alive: for ResNet-50 at 224 px, batch 256, the last BN of every block and the
    /// shortcut BNs hold 3.4 GiB).
    #[cfg(feature = "cuda")]
    fast: Option<(crate::cuda::bn::BatchNormTrain, Tensor, Option<Tensor>)>,
    /// The CPU kernels' batch statistics, and the output when a ReLU follows.
    cpu: Option<(cpu::BnStats, Option<Tensor>)>,
}

/// Training [`batch_norm`] (+ ReLU) for the explicit training pass: batch statistics, running
/// statistics updated, no graph.
pub fn batch_norm_train(x: &Tensor, bn: &BatchNorm2d, relu: bool) -> Result<(Tensor, BnSaved)> {
    #[cfg(feature = "cuda")]
    if is_cuda_fast(x) {
        let x = x.contiguous()?;
        let gamma = bn.weight().detach().to_dtype(DType::F32)?;
        let beta = bn.bias().detach().to_dtype(DType::F32)?;
        let op = crate::cuda::bn::BatchNormTrain::new(
            bn.running_mean().as_tensor().clone(),
            bn.running_var().as_tensor().clone(),
            bn.eps(),
            bn.momentum(),
            relu,
        );
        let y = x.apply_op3_no_bwd(&gamma, &beta, &op)?;
        let saved = BnSaved {
            x,
            relu,
            fast: Some((op, gamma, relu.then(|| y.clone()))),
            cpu: None,
        };
        return Ok((y, saved));
    }
    if is_cpu_fast(x) && bn.weight().dtype() == DType::F32 {
        let (y, st) = cpu::batch_norm_train(x, bn, relu)?;
        let saved = BnSaved {
            x: x.clone(),
            relu,
            #[cfg(feature = "cuda")]
            fast: None,
            cpu: Some((st, relu.then(|| y.clone()))),
        };
        return Ok((y, saved));
    }
    let y = batch_norm(&x.detach(), bn, true, relu)?.detach();
    let saved = BnSaved {
        x: x.clone(),
        relu,
        #[cfg(feature = "cuda")]
        fast: None,
        cpu: None,
    };
    Ok((y, saved))
}

/// The gradients of a [`batch_norm_train`]: `(dx, dgamma, dbeta)`, the parameter gradients in
/// the parameters' dtype.
pub fn batch_norm_backward(
    saved: &BnSaved,
    bn: &BatchNorm2d,
    dy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if let Some((op, gamma, y)) = &saved.fast {
        let (dx, dg, db) = op.backward(&saved.x, gamma, y.as_ref(), &dy.contiguous()?)?;
        let dg = dg.to_dtype(bn.weight().dtype())?;
        let db = db.to_dtype(bn.bias().dtype())?;
        return Ok((dx, dg, db));
    }
    let relu = saved.relu;
    if let Some((st, y)) = &saved.cpu {
        return cpu::batch_norm_backward(&saved.x, y.as_ref(), dy, bn, st, relu);
    }
    let g = vjp(&[&saved.x, bn.weight(), bn.bias()], dy, |t| {
        let y = to_nhwc(&bn.train_output_with(&to_nchw(&t[0])?, &t[1], &t[2])?)?;
        if relu {
            y.relu()
        } else {
            Ok(y)
        }
    })?;
    let mut g = g.into_iter();
    match (g.next(), g.next(), g.next()) {
        (Some(dx), Some(dg), Some(db)) => Ok((dx, dg, db)),
        _ => unreachable!("vjp returns one gradient per input"),
    }
}

/// What [`max_pool_backward`] needs from [`max_pool_train`].
#[derive(Debug)]
pub struct MaxPoolSaved {
    x: Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
    #[cfg(feature = "cuda")]
    fast: Option<crate::cuda::pool::MaxPoolNhwc>,
    /// The CPU kernel's argmax map.
    cpu_idx: Option<Vec<u8>>,
}

/// [`max_pool`] for the explicit training pass.
pub fn max_pool_train(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<(Tensor, MaxPoolSaved)> {
    #[cfg(feature = "cuda")]
    if is_cuda_fast(x) {
        let op = crate::cuda::pool::MaxPoolNhwc::new(kernel, stride, padding)?;
        let x = x.contiguous()?;
        let y = x.apply_op1_no_bwd(&op)?;
        let saved = MaxPoolSaved {
            x,
            kernel,
            stride,
            padding,
            fast: Some(op),
            cpu_idx: None,
        };
        return Ok((y, saved));
    }
    if is_cpu_fast(x) {
        let (y, idx) = cpu::max_pool_train(x, kernel, stride, padding)?;
        let saved = MaxPoolSaved {
            x: x.clone(),
            kernel,
            stride,
            padding,
            #[cfg(feature = "cuda")]
            fast: None,
            cpu_idx: Some(idx),
        };
        return Ok((y, saved));
    }
    let y = max_pool(x, kernel, stride, padding)?;
    let saved = MaxPoolSaved {
        x: x.clone(),
        kernel,
        stride,
        padding,
        #[cfg(feature = "cuda")]
        fast: None,
        cpu_idx: None,
    };
    Ok((y, saved))
}

/// `dx` of a [`max_pool_train`].
pub fn max_pool_backward(saved: &MaxPoolSaved, dy: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(op) = &saved.fast {
        use candle_core::CustomOp1;
        return op
            .bwd(&saved.x, dy, dy)?
            .ok_or_else(|| candle_core::Error::Msg("max-pool backward: no gradient".into()));
    }
    let (k, s, p) = (saved.kernel, saved.stride, saved.padding);
    if let Some(idx) = &saved.cpu_idx {
        return cpu::max_pool_backward(saved.x.dims4()?, idx, dy, k, s, p);
    }
    let g = vjp(&[&saved.x], dy, |t| max_pool(&t[0], k, s, p))?;
    Ok(g.into_iter().next().expect("one gradient"))
}

/// `dx` of [`global_avg_pool`] at input `x` for the feature gradient `dy` (`[N, C]` f32).
pub fn global_avg_pool_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if is_cuda_fast(x) {
        use candle_core::CustomOp1;
        return crate::cuda::pool::GlobalAvgPoolNhwc
            .bwd(x, dy, dy)?
            .ok_or_else(|| candle_core::Error::Msg("avg-pool backward: no gradient".into()));
    }
    if is_cpu_fast(x) {
        return cpu::global_avg_pool_backward(x.dims4()?, dy);
    }
    let g = vjp(&[x], dy, |t| global_avg_pool(&t[0]))?;
    Ok(g.into_iter().next().expect("one gradient"))
}

/// What [`add_relu_backward`] needs from [`add_relu_train`].
#[derive(Debug)]
pub struct AddReluSaved {
    /// The output (fast path: its backward needs only the ReLU mask and the scales).
    #[cfg(feature = "cuda")]
    fast_y: Option<Tensor>,
    /// The output of the CPU kernel (its backward needs the mask and the scales).
    cpu_y: Option<Tensor>,
    /// The summands (reference path).
    inputs: Option<(Tensor, Tensor)>,
    scale: Option<Tensor>,
}

/// `relu(a * scale + b)` for the explicit training pass, where `scale` is stochastic depth's
/// per-sample mask (`[N, 1, 1, 1]`, see [`crate::model::drop_path_mask`]) or `None` for
/// `relu(a + b)`. The fast path folds the scaling into the add (one pass over memory instead of
/// two); the result equals the unfused multiply, then [`add_relu`].
pub fn add_relu_train(
    a: &Tensor,
    b: &Tensor,
    scale: Option<&Tensor>,
) -> Result<(Tensor, AddReluSaved)> {
    #[cfg(feature = "cuda")]
    if is_cuda_fast(a) && b.dtype() == DType::BF16 {
        let (a, b) = (a.contiguous()?, b.contiguous()?);
        let scale = scale
            .map(|s| s.to_dtype(DType::BF16)?.contiguous())
            .transpose()?;
        let y = match &scale {
            Some(s) => crate::cuda::pool::add_relu_scaled(&a, &b, s)?,
            None => add_relu(&a, &b)?,
        };
        let saved = AddReluSaved {
            fast_y: Some(y.clone()),
            cpu_y: None,
            inputs: None,
            scale,
        };
        return Ok((y, saved));
    }
    if is_cpu_fast(a) && b.dtype() == DType::F32 {
        let y = cpu::add_relu(a, b, scale)?;
        let saved = AddReluSaved {
            #[cfg(feature = "cuda")]
            fast_y: None,
            cpu_y: Some(y.clone()),
            inputs: None,
            scale: scale.cloned(),
        };
        return Ok((y, saved));
    }
    let y = match scale {
        Some(s) => add_relu(&a.broadcast_mul(s)?, b)?,
        None => add_relu(a, b)?,
    };
    let saved = AddReluSaved {
        #[cfg(feature = "cuda")]
        fast_y: None,
        cpu_y: None,
        inputs: Some((a.clone(), b.clone())),
        scale: scale.cloned(),
    };
    Ok((y, saved))
}

/// The gradients `(da, db)` of both inputs of an [`add_relu_train`] (`da` includes the scale).
pub fn add_relu_backward(saved: &AddReluSaved, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if let Some(y) = &saved.fast_y {
        if let Some(s) = &saved.scale {
            return crate::cuda::pool::add_relu_scaled_backward(y, dy, s);
        }
        use candle_core::CustomOp2;
        if let (Some(da), Some(db)) = crate::cuda::pool::AddRelu.bwd(y, y, y, dy)? {
            return Ok((da, db));
        }
    }
    if let Some(y) = &saved.cpu_y {
        return cpu::add_relu_backward(y, dy, saved.scale.as_ref());
    }
    let Some((a, b)) = &saved.inputs else {
        candle_core::bail!("add-relu backward: the forward kept no inputs")
    };
    let scale = saved.scale.as_ref();
    let g = vjp(&[a, b], dy, |t| match scale {
        Some(s) => add_relu(&t[0].broadcast_mul(s)?, &t[1]),
        None => add_relu(&t[0], &t[1]),
    })?;
    let mut g = g.into_iter();
    match (g.next(), g.next()) {
        (Some(da), Some(db)) => Ok((da, db)),
        _ => unreachable!("vjp returns one gradient per input"),
    }
}
