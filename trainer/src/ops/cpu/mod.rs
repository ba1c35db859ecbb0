//! The CPU fast path of the channels-last layers (f32): convolutions as tiled GEMMs
//! ([`conv`]), BatchNorm with the ReLU fused, max-pool with an argmax map, global average pool
//! and the residual add + ReLU ([`kernels`]), all multi-threaded on rayon's pool and
//! deterministic for any thread count.
//!
//! [`crate::ops::nhwc`] dispatches here for f32 CPU tensors; this module wraps the kernels as
//! tensor functions (for the explicit training pass) and as candle custom ops whose backward
//! calls the same kernels (for candle's graph), so both passes compute the same values.

pub mod conv;
pub mod kernels;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape,
    Storage, Tensor, TensorId,
};

use crate::model::BatchNorm2d;
use crate::ops::Activation;
use conv::ConvGeom;
pub use kernels::BnStats;

/// The f32 values of a CPU tensor, contiguous, passed to `f`.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = if t.is_contiguous() {
        t.clone()
    } else {
        t.contiguous()?
    };
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cs) = &*storage else {
        bail!("cpu kernels: a tensor on {:?}", t.device().location())
    };
    let s = cs.as_slice::<f32>()?;
    let start = layout.start_offset();
    Ok(f(&s[start..start + t.elem_count()]))
}

/// The values of a contiguous f32 CPU storage and layout.
fn storage_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    if !l.is_contiguous() {
        bail!("cpu kernels: a contiguous input is required")
    }
    let v = s.as_slice::<f32>()?;
    Ok(&v[l.start_offset()..l.start_offset() + l.shape().elem_count()])
}

fn tensor(v: Vec<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// The geometry of `x` (`[N, H, W, C]`) convolved with an OIHW filter of `w_dims`.
fn geom(
    x: (usize, usize, usize, usize),
    w_dims: (usize, usize, usize, usize),
    stride: usize,
    pad: usize,
    groups: usize,
) -> Result<ConvGeom> {
    let (n, h, w, c) = x;
    let (k, cg, r, s) = w_dims;
    if r != s || cg * groups != c || k % groups != 0 || h + 2 * pad < r || w + 2 * pad < r {
        bail!(
            "conv2d cpu: input [{n}, {h}, {w}, {c}] and filter [{k}, {cg}, {r}, {s}] do not fit \
             (groups {groups}, padding {pad})"
        )
    }
    Ok(ConvGeom {
        n,
        h,
        w,
        c,
        k,
        r,
        stride,
        pad,
        groups,
    })
}

/// Channels-last convolution (no graph): `x` `[N, H, W, C]` f32, `weight` OIHW.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    pad: usize,
    groups: usize,
) -> Result<Tensor> {
    let geo = geom(x.dims4()?, weight.dims4()?, stride, pad, groups)?;
    let w = weight.to_dtype(DType::F32)?;
    let (oh, ow) = geo.out_hw();
    let mut y = vec![0f32; geo.m() * geo.k];
    with_f32(x, |xs| with_f32(&w, |w| conv::forward(xs, &geo, w, &mut y)))??;
    tensor(y, (geo.n, oh, ow, geo.k))
}

/// A folded evaluation filter (RSCK) and its shift, by (conv weight, BatchNorm weight).
type FoldedCache = HashMap<(TensorId, TensorId), Arc<(Vec<f32>, Vec<f32>)>>;

thread_local! {
    /// The folded filters of [`conv_bn_eval`] while a [`with_eval_cache`] runs on this thread.
    static EVAL_CACHE: RefCell<Option<FoldedCache>> = const { RefCell::new(None) };
}

/// Runs `f` with the folded filters of [`conv_bn_eval`] kept between its calls on this thread:
/// each conv's filter is folded with its BatchNorm and laid out once for the whole of `f`
/// instead of once per batch. For an evaluation pass: the weights and running statistics must
/// not change while `f` runs. Nested calls keep the outer cache.
pub fn with_eval_cache<R>(f: impl FnOnce() -> R) -> R {
    /// Drops the cache when `f` returns or unwinds.
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            if self.0 {
                EVAL_CACHE.with(|c| *c.borrow_mut() = None);
            }
        }
    }
    let fresh = EVAL_CACHE.with(|c| {
        let mut c = c.borrow_mut();
        let fresh = c.is_none();
        if fresh {
            *c = Some(HashMap::new());
        }
        fresh
    });
    let _reset = Reset(fresh);
    f()
}

/// The evaluation convolution followed by `bn` on its running statistics (folded into the
/// filter and a shift), then `residual` (`[N, OH, OW, K]`) added, then `act`: one pass over the
/// output (no graph).
#[allow(clippy::too_many_arguments)]
pub fn conv_bn_eval(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    pad: usize,
    groups: usize,
    bn: &BatchNorm2d,
    act: Activation,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let geo = geom(x.dims4()?, weight.dims4()?, stride, pad, groups)?;
    let (oh, ow) = geo.out_hw();
    let key = (weight.id(), bn.weight().id());
    let folded = match EVAL_CACHE.with(|c| c.borrow().as_ref().and_then(|m| m.get(&key).cloned())) {
        Some(f) => f,
        None => {
            let (scale, shift) = bn.folded_scale_shift()?;
            let (scale, shift) = (scale.to_vec1::<f32>()?, shift.to_vec1::<f32>()?);
            if scale.len() != geo.k {
                bail!(
                    "conv + batch norm: {} output channels, a batch norm of {}",
                    geo.k,
                    scale.len()
                )
            }
            let w = with_f32(&weight.to_dtype(DType::F32)?, |w| {
                conv::folded_filter(w, &geo, &scale)
            })?;
            let f = Arc::new((w, shift));
            EVAL_CACHE.with(|c| {
                if let Some(m) = c.borrow_mut().as_mut() {
                    m.insert(key, f.clone());
                }
            });
            f
        }
    };
    let (w, shift) = (&folded.0, &folded.1);
    if w.len() != geo.k * geo.patch() {
        bail!("conv + batch norm: a cached filter of another shape")
    }
    let residual = match residual {
        Some(r) if r.dims() != [geo.n, oh, ow, geo.k] => bail!(
            "conv + batch norm: residual {:?} for an output [{}, {oh}, {ow}, {}]",
            r.dims(),
            geo.n,
            geo.k
        ),
        Some(r) => Some(r.to_dtype(DType::F32)?),
        None => None,
    };
    let mut y = vec![0f32; geo.m() * geo.k];
    let mut run = |xs: &[f32], res: Option<&[f32]>| {
        let epilogue = conv::Epilogue {
            shift,
            residual: res,
            act,
        };
        conv::forward_prepared(xs, &geo, w, &epilogue, &mut y)
    };
    with_f32(x, |xs| match &residual {
        Some(r) => with_f32(r, |r| run(xs, Some(r))),
        None => {
            run(xs, None);
            Ok(())
        }
    })??;
    tensor(y, (geo.n, oh, ow, geo.k))
}

/// The gradients of [`conv2d`] at `x`: `dx` when `need_dx`, and `dw` in OIHW (the weight's
/// dtype).
pub fn conv2d_backward(
    x: &Tensor,
    weight: &Tensor,
    dy: &Tensor,
    stride: usize,
    pad: usize,
    groups: usize,
    need_dx: bool,
) -> Result<(Option<Tensor>, Tensor)> {
    let geo = geom(x.dims4()?, weight.dims4()?, stride, pad, groups)?;
    let dy = dy.to_dtype(DType::F32)?;
    let dx = if need_dx {
        let w = weight.to_dtype(DType::F32)?;
        let mut dx = vec![0f32; geo.n * geo.h * geo.w * geo.c];
        with_f32(&dy, |d| {
            with_f32(&w, |w| conv::backward_data(d, &geo, w, &mut dx))
        })??;
        Some(tensor(dx, (geo.n, geo.h, geo.w, geo.c))?)
    } else {
        None
    };
    let mut dw = vec![0f32; weight.elem_count()];
    with_f32(x, |xs| {
        with_f32(&dy, |d| conv::backward_filter(xs, d, &geo, &mut dw))
    })??;
    let dw = tensor(dw, weight.shape())?.to_dtype(weight.dtype())?;
    Ok((dx, dw))
}

/// [`conv2d`] as a candle op (its backward: [`conv2d_backward`]).
#[derive(Clone, Copy, Debug)]
pub struct Conv2dCpu {
    /// Stride.
    pub stride: usize,
    /// Padding.
    pub pad: usize,
    /// Groups.
    pub groups: usize,
}

impl CustomOp2 for Conv2dCpu {
    fn name(&self) -> &'static str {
        "conv2d-nhwc-cpu"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let geo = geom(
            xl.shape().dims4()?,
            wl.shape().dims4()?,
            self.stride,
            self.pad,
            self.groups,
        )?;
        let (oh, ow) = geo.out_hw();
        let mut y = vec![0f32; geo.m() * geo.k];
        conv::forward(storage_f32(xs, xl)?, &geo, storage_f32(ws, wl)?, &mut y);
        Ok((CpuStorage::F32(y), Shape::from((geo.n, oh, ow, geo.k))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = conv2d_backward(x, w, dy, self.stride, self.pad, self.groups, true)?;
        Ok((dx, Some(dw)))
    }
}

/// Training BatchNorm (+ ReLU), no graph: `y`, and the statistics its backward needs. Updates
/// the running statistics.
pub fn batch_norm_train(x: &Tensor, bn: &BatchNorm2d, relu: bool) -> Result<(Tensor, BnStats)> {
    let c = x.dim(candle_core::D::Minus1)?;
    let gamma = bn.weight().to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let beta = bn.bias().to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let mut rm = bn.running_mean().as_tensor().to_vec1::<f32>()?;
    let mut rv = bn.running_var().as_tensor().to_vec1::<f32>()?;
    let (y, st) = with_f32(x, |xs| {
        kernels::bn_train_forward(
            xs,
            c,
            &gamma,
            &beta,
            bn.eps(),
            bn.momentum(),
            &mut rm,
            &mut rv,
            relu,
        )
    })?;
    bn.running_mean().set(&tensor(rm, c)?)?;
    bn.running_var().set(&tensor(rv, c)?)?;
    Ok((tensor(y, x.shape())?, st))
}

/// The gradients `(dx, dgamma, dbeta)` of [`batch_norm_train`] (the parameter gradients in the
/// parameters' dtype); `y` is read only with the ReLU.
pub fn batch_norm_backward(
    x: &Tensor,
    y: Option<&Tensor>,
    dy: &Tensor,
    bn: &BatchNorm2d,
    st: &BnStats,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let c = x.dim(candle_core::D::Minus1)?;
    let gamma = bn.weight().to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let dy = dy.to_dtype(DType::F32)?;
    let y = match (relu, y) {
        (true, Some(y)) => Some(y.to_dtype(DType::F32)?.contiguous()?),
        (true, None) => bail!("batch norm backward: the fused ReLU needs the forward's output"),
        _ => None,
    };
    let (dx, dg, db) = with_f32(x, |xs| {
        with_f32(&dy, |d| match &y {
            Some(y) => with_f32(y, |ys| {
                kernels::bn_train_backward(xs, Some(ys), d, c, &gamma, st, relu)
            }),
            None => Ok(kernels::bn_train_backward(xs, None, d, c, &gamma, st, relu)),
        })
    })???;
    Ok((
        tensor(dx, x.shape())?,
        tensor(dg, c)?.to_dtype(bn.weight().dtype())?,
        tensor(db, c)?.to_dtype(bn.bias().dtype())?,
    ))
}

/// Evaluation BatchNorm (+ ReLU) with the folded running statistics.
pub fn batch_norm_eval(x: &Tensor, bn: &BatchNorm2d, relu: bool) -> Result<Tensor> {
    let c = x.dim(candle_core::D::Minus1)?;
    let mean = bn.running_mean().as_tensor().to_vec1::<f32>()?;
    let var = bn.running_var().as_tensor().to_vec1::<f32>()?;
    let gamma = bn.weight().to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let beta = bn.bias().to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let eps = bn.eps() as f32;
    let scale: Vec<f32> = (0..c).map(|j| gamma[j] / (var[j] + eps).sqrt()).collect();
    let y = with_f32(x, |xs| kernels::apply(xs, c, &mean, &scale, &beta, relu))?;
    tensor(y, x.shape())
}

/// Training BatchNorm (+ ReLU) as a candle op over `(x, gamma, beta)`: updates the running
/// statistics in its forward and keeps the batch statistics for its backward.
#[derive(Debug)]
pub struct BatchNormTrainCpu {
    bn: BatchNorm2d,
    relu: bool,
    saved: Mutex<Option<BnStats>>,
}

impl BatchNormTrainCpu {
    /// The op of `bn` (its running statistics are updated).
    pub fn new(bn: &BatchNorm2d, relu: bool) -> Self {
        Self {
            bn: bn.clone(),
            relu,
            saved: Mutex::new(None),
        }
    }
}

impl CustomOp3 for BatchNormTrainCpu {
    fn name(&self) -> &'static str {
        "batch-norm-nhwc-train-cpu"
    }

    #[allow(clippy::too_many_arguments)]
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let c = *xl.shape().dims().last().unwrap_or(&1);
        let mut rm = self.bn.running_mean().as_tensor().to_vec1::<f32>()?;
        let mut rv = self.bn.running_var().as_tensor().to_vec1::<f32>()?;
        let (y, st) = kernels::bn_train_forward(
            storage_f32(xs, xl)?,
            c,
            storage_f32(gs, gl)?,
            storage_f32(bs, bl)?,
            self.bn.eps(),
            self.bn.momentum(),
            &mut rm,
            &mut rv,
            self.relu,
        );
        self.bn.running_mean().set(&tensor(rm, c)?)?;
        self.bn.running_var().set(&tensor(rv, c)?)?;
        *self.saved.lock().expect("bn stats poisoned") = Some(st);
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _gamma: &Tensor,
        _beta: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let st = self
            .saved
            .lock()
            .expect("bn stats poisoned")
            .take()
            .ok_or_else(|| candle_core::Error::Msg("batch norm backward ran twice".into()))?;
        let (dx, dg, db) = batch_norm_backward(x, Some(y), dy, &self.bn, &st, self.relu)?;
        Ok((Some(dx), Some(dg), Some(db)))
    }
}

/// Max-pool (no graph): the output and the argmax map its backward needs.
pub fn max_pool_train(x: &Tensor, k: usize, s: usize, p: usize) -> Result<(Tensor, Vec<u8>)> {
    let (n, h, w, c) = x.dims4()?;
    if p >= k || h + 2 * p < k || w + 2 * p < k {
        bail!("max-pool cpu: window {k}/{s}/{p} does not fit [{n}, {h}, {w}, {c}]")
    }
    let (y, idx, oh, ow) = with_f32(x, |xs| kernels::max_pool_forward(xs, n, h, w, c, k, s, p))?;
    Ok((tensor(y, (n, oh, ow, c))?, idx))
}

/// `dx` of [`max_pool_train`] at input dims `x_dims`.
pub fn max_pool_backward(
    x_dims: (usize, usize, usize, usize),
    idx: &[u8],
    dy: &Tensor,
    k: usize,
    s: usize,
    p: usize,
) -> Result<Tensor> {
    let (n, h, w, c) = x_dims;
    let dy = dy.to_dtype(DType::F32)?;
    let dx = with_f32(&dy, |d| {
        kernels::max_pool_backward(d, idx, n, h, w, c, k, s, p)
    })?;
    tensor(dx, (n, h, w, c))
}

/// Max-pool as a candle op.
#[derive(Debug)]
pub struct MaxPoolCpu {
    /// Window side.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Padding.
    pub pad: usize,
    argmax: Mutex<Option<Vec<u8>>>,
}

impl MaxPoolCpu {
    /// A `kernel x kernel` max-pool.
    pub fn new(kernel: usize, stride: usize, pad: usize) -> Self {
        Self {
            kernel,
            stride,
            pad,
            argmax: Mutex::new(None),
        }
    }
}

impl CustomOp1 for MaxPoolCpu {
    fn name(&self) -> &'static str {
        "max-pool-nhwc-cpu"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, h, w, c) = xl.shape().dims4()?;
        let (k, s, p) = (self.kernel, self.stride, self.pad);
        if p >= k || h + 2 * p < k || w + 2 * p < k {
            bail!("max-pool cpu: window {k}/{s}/{p} does not fit [{n}, {h}, {w}, {c}]")
        }
        let (y, idx, oh, ow) = kernels::max_pool_forward(storage_f32(xs, xl)?, n, h, w, c, k, s, p);
        *self.argmax.lock().expect("argmax poisoned") = Some(idx);
        Ok((CpuStorage::F32(y), Shape::from((n, oh, ow, c))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let idx = self
            .argmax
            .lock()
            .expect("argmax poisoned")
            .take()
            .ok_or_else(|| candle_core::Error::Msg("max-pool backward ran twice".into()))?;
        Ok(Some(max_pool_backward(
            x.dims4()?,
            &idx,
            dy,
            self.kernel,
            self.stride,
            self.pad,
        )?))
    }
}

/// Global average pool `[N, H, W, C]` -> `[N, C]`.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    let (n, h, w, c) = x.dims4()?;
    let y = with_f32(x, |xs| kernels::gap_forward(xs, n, h * w, c))?;
    tensor(y, (n, c))
}

/// `dx` of [`global_avg_pool`].
pub fn global_avg_pool_backward(
    x_dims: (usize, usize, usize, usize),
    dy: &Tensor,
) -> Result<Tensor> {
    let (n, h, w, c) = x_dims;
    let dy = dy.to_dtype(DType::F32)?;
    let dx = with_f32(&dy, |d| kernels::gap_backward(d, n, h * w, c))?;
    tensor(dx, (n, h, w, c))
}

/// Global average pool as a candle op.
#[derive(Clone, Copy, Debug)]
pub struct GlobalAvgPoolCpu;

impl CustomOp1 for GlobalAvgPoolCpu {
    fn name(&self) -> &'static str {
        "global-avg-pool-nhwc-cpu"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, h, w, c) = xl.shape().dims4()?;
        let y = kernels::gap_forward(storage_f32(xs, xl)?, n, h * w, c);
        Ok((CpuStorage::F32(y), Shape::from((n, c))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(global_avg_pool_backward(x.dims4()?, dy)?))
    }
}

/// The SiLU gradient at `x` (no graph).
pub fn silu_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let dy = dy.to_dtype(DType::F32)?;
    let dx = with_f32(x, |xv| with_f32(&dy, |d| kernels::silu_backward(xv, d)))??;
    tensor(dx, x.shape())
}

/// `(dx, dgate)` of [`ChannelScaleCpu`] at `(x, gate)` (no graph).
pub fn channel_scale_backward(x: &Tensor, gate: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, h, w, c) = x.dims4()?;
    let dy = dy.to_dtype(DType::F32)?;
    let (dx, dg) = with_f32(x, |xv| {
        with_f32(gate, |gv| {
            with_f32(&dy, |d| {
                kernels::channel_scale_backward(xv, gv, d, h * w, c)
            })
        })
    })???;
    Ok((tensor(dx, (n, h, w, c))?, tensor(dg, (n, c))?))
}

/// `dx` of [`AvgPool2CeilCpu`] for an input of `x_dims` (no graph).
pub fn avg_pool2_ceil_backward(
    x_dims: (usize, usize, usize, usize),
    dy: &Tensor,
) -> Result<Tensor> {
    let (n, h, w, c) = x_dims;
    let dy = dy.to_dtype(DType::F32)?;
    let dx = with_f32(&dy, |d| kernels::avg_pool2_ceil_backward(d, n, h, w, c))?;
    tensor(dx, (n, h, w, c))
}

/// ResNet-D's 2x2 ceil-mode average pool (`[N, H, W, C]`) as a candle op.
#[derive(Clone, Copy, Debug)]
pub struct AvgPool2CeilCpu;

impl CustomOp1 for AvgPool2CeilCpu {
    fn name(&self) -> &'static str {
        "avg-pool-2x2-ceil-nhwc-cpu"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, h, w, c) = xl.shape().dims4()?;
        let y = kernels::avg_pool2_ceil_forward(storage_f32(xs, xl)?, n, h, w, c);
        Ok((
            CpuStorage::F32(y),
            Shape::from((n, h.div_ceil(2), w.div_ceil(2), c)),
        ))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(avg_pool2_ceil_backward(x.dims4()?, dy)?))
    }
}

/// Channel attention's gate `x * g` (`x`: `[N, H, W, C]`, `g`: `[N, C]`) as a candle op; the
/// backward returns both gradients from [`kernels::channel_scale_backward`].
#[derive(Clone, Copy, Debug)]
pub struct ChannelScaleCpu;

impl CustomOp2 for ChannelScaleCpu {
    fn name(&self) -> &'static str {
        "channel-scale-nhwc-cpu"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, h, w, c) = xl.shape().dims4()?;
        if gl.shape().dims() != [n, c] {
            bail!(
                "channel scale cpu: gate {:?} does not fit input {:?} (expected [{n}, {c}])",
                gl.shape(),
                xl.shape()
            )
        }
        let y =
            kernels::channel_scale_forward(storage_f32(xs, xl)?, storage_f32(gs, gl)?, h * w, c);
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dg) = channel_scale_backward(x, g, dy)?;
        Ok((Some(dx), Some(dg)))
    }
}

/// The per-sample scales of stochastic depth (`[N, 1, 1, 1]`) as values.
fn scales(scale: Option<&Tensor>) -> Result<Option<Vec<f32>>> {
    scale
        .map(|s| s.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
        .transpose()
}

/// `relu(a * scale + b)` (no graph).
pub fn add_relu(a: &Tensor, b: &Tensor, scale: Option<&Tensor>) -> Result<Tensor> {
    let n = a.dim(0)?;
    let per = a.elem_count() / n.max(1);
    let s = scales(scale)?;
    let y = with_f32(a, |av| {
        with_f32(b, |bv| kernels::add_relu_forward(av, bv, s.as_deref(), per))
    })??;
    tensor(y, a.shape())
}

/// The backward of [`add_relu`] from its output: `(d_branch, d_shortcut)`.
pub fn add_relu_backward(
    y: &Tensor,
    dy: &Tensor,
    scale: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let n = y.dim(0)?;
    let per = y.elem_count() / n.max(1);
    let s = scales(scale)?;
    let dy = dy.to_dtype(DType::F32)?;
    let (db, ds) = with_f32(y, |yv| {
        with_f32(&dy, |d| {
            kernels::add_relu_backward(yv, d, s.as_deref(), per)
        })
    })??;
    Ok((tensor(db, y.shape())?, tensor(ds, y.shape())?))
}

/// `relu(a + b)` as a candle op (both inputs get the masked gradient).
#[derive(Clone, Copy, Debug)]
pub struct AddReluCpu;

impl CustomOp2 for AddReluCpu {
    fn name(&self) -> &'static str {
        "add-relu-cpu"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if al.shape() != bl.shape() {
            bail!(
                "add-relu cpu: shapes {:?} and {:?} differ",
                al.shape(),
                bl.shape()
            )
        }
        let n = al.shape().dims().first().copied().unwrap_or(1).max(1);
        let per = al.shape().elem_count() / n;
        let y = kernels::add_relu_forward(storage_f32(a, al)?, storage_f32(b, bl)?, None, per);
        Ok((CpuStorage::F32(y), al.shape().clone()))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (da, db) = add_relu_backward(y, dy, None)?;
        Ok((Some(da), Some(db)))
    }
}
