//! Channels-last bf16 pooling and the residual add + ReLU, as candle custom ops.
//!
//! * Max-pool `k x k`, stride `s`, padding `p` (the stem's 3/2/1): the forward records the
//!   window position of each maximum (the first one in row-major window order; a NaN counts as a
//!   maximum, so the last NaN of a window wins: both as the CPU op) in a u8 map; the backward
//!   gathers, per input element, the gradients of the outputs whose maximum it was. No atomics:
//!   the result does not depend on scheduling.
//! * Global average pool `[N, H, W, C] -> [N, C]`: sums in f32, output f32 (the classifier runs
//!   in f32).
//! * `relu(a + b)` for the end of a residual block, one pass; its backward masks the gradient by
//!   `y > 0` and hands the same tensor to both inputs.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::CudaStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::kernels::{self, grid_1d, Module};
use super::{alloc_storage, cuda_device, device_ptr, storage_ptr, tensor_from_storage};

/// The kernels of this module.
pub const MODULE: Module = Module {
    name: "rsb_pool",
    source: r#"
extern "C" __global__ void maxpool_fwd(const bf16* x, int N, int H, int W, int C, int OH, int OW,
                                       int k, int s, int p, bf16* y, u8* idx) {
    long long total = (long long)N * OH * OW * C;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    int c = (int)(i % C);
    long long t = i / C;
    int ow = (int)(t % OW); t /= OW;
    int oh = (int)(t % OH);
    int n = (int)(t / OH);
    float best = 0.f;
    int bi = -1;
    for (int kh = 0; kh < k; ++kh) {
        int ih = oh * s - p + kh;
        if (ih < 0 || ih >= H) continue;
        for (int kw = 0; kw < k; ++kw) {
            int iw = ow * s - p + kw;
            if (iw < 0 || iw >= W) continue;
            float v = bf2f(x[(((size_t)n * H + ih) * W + iw) * C + c]);
            // A NaN wins (`v != v`), as in PyTorch and the CPU op.
            if (bi < 0 || v > best || v != v) { best = v; bi = kh * k + kw; }
        }
    }
    y[i] = f2bf(best);
    idx[i] = (u8)(bi < 0 ? 0 : bi);
}

extern "C" __global__ void maxpool_bwd(const bf16* dy, const u8* idx, int N, int H, int W, int C,
                                       int OH, int OW, int k, int s, int p, bf16* dx) {
    long long total = (long long)N * H * W * C;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    int c = (int)(i % C);
    long long t = i / C;
    int iw = (int)(t % W); t /= W;
    int ih = (int)(t % H);
    int n = (int)(t / H);
    int lo_h = ih + p - k + 1, lo_w = iw + p - k + 1;
    int oh0 = lo_h <= 0 ? 0 : (lo_h + s - 1) / s;
    int ow0 = lo_w <= 0 ? 0 : (lo_w + s - 1) / s;
    int oh1 = min(OH - 1, (ih + p) / s);
    int ow1 = min(OW - 1, (iw + p) / s);
    float acc = 0.f;
    for (int oh = oh0; oh <= oh1; ++oh) {
        for (int ow = ow0; ow <= ow1; ++ow) {
            size_t o = (((size_t)n * OH + oh) * OW + ow) * C + c;
            int want = (ih - (oh * s - p)) * k + (iw - (ow * s - p));
            if ((int)idx[o] == want) acc += bf2f(dy[o]);
        }
    }
    dx[i] = f2bf(acc);
}

extern "C" __global__ void gap_fwd(const bf16* x, int N, int HW, int C, float* y) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)N * C) return;
    int c = (int)(i % C);
    int n = (int)(i / C);
    const bf16* px = x + (size_t)n * HW * C + c;
    float acc = 0.f;
    for (int j = 0; j < HW; ++j) acc += bf2f(px[(size_t)j * C]);
    y[i] = acc / (float)HW;
}

extern "C" __global__ void gap_bwd(const float* dy, int N, int HW, int C, bf16* dx) {
    long long total = (long long)N * HW * C;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    int c = (int)(i % C);
    int n = (int)(i / ((long long)HW * C));
    dx[i] = f2bf(dy[(size_t)n * C + c] / (float)HW);
}

extern "C" __global__ void add_relu_fwd(const bf16* a, const bf16* b, long long n, bf16* y) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = bf2f(a[i]) + bf2f(b[i]);
    y[i] = f2bf(v < 0.f ? 0.f : v);
}

extern "C" __global__ void relu_bwd(const bf16* y, const bf16* dy, long long n, bf16* dx) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    dx[i] = bf2f(y[i]) > 0.f ? dy[i] : (bf16)0;
}

// relu(a * scale[sample] + b): a residual block's end with stochastic depth folded in. The
// product is rounded to bf16 first, so this equals the unfused bf16 multiply, then add_relu_fwd.
extern "C" __global__ void add_relu_scaled_fwd(const bf16* a, const bf16* b, const bf16* scale,
                                               long long per_sample, long long n, bf16* y) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float p = bf2f(f2bf(bf2f(a[i]) * bf2f(scale[i / per_sample])));
    float v = p + bf2f(b[i]);
    y[i] = f2bf(v < 0.f ? 0.f : v);
}

// Its backward: the shortcut's gradient g = relu'(y) * dy and the branch's g * scale[sample].
extern "C" __global__ void relu_scaled_bwd(const bf16* y, const bf16* dy, const bf16* scale,
                                           long long per_sample, long long n, bf16* d_short,
                                           bf16* d_branch) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    bf16 g = bf2f(y[i]) > 0.f ? dy[i] : (bf16)0;
    d_short[i] = g;
    d_branch[i] = f2bf(bf2f(g) * bf2f(scale[i / per_sample]));
}
"#,
};

fn bf16_input(s: &CudaStorage, what: &str) -> Result<()> {
    if s.dtype() != DType::BF16 {
        bail!("{what}: input must be bf16, got {:?}", s.dtype())
    }
    Ok(())
}

/// Max-pool over channels-last bf16 input.
#[derive(Debug)]
pub struct MaxPoolNhwc {
    /// Window side.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Padding (implicit `-inf`).
    pub pad: usize,
    argmax: Mutex<Option<Tensor>>,
}

impl MaxPoolNhwc {
    /// A `kernel x kernel` max-pool.
    pub fn new(kernel: usize, stride: usize, pad: usize) -> Result<Self> {
        if kernel == 0 || kernel * kernel > 255 || stride == 0 || pad >= kernel {
            bail!("max-pool nhwc: unsupported kernel {kernel}, stride {stride}, padding {pad}")
        }
        Ok(Self {
            kernel,
            stride,
            pad,
            argmax: Mutex::new(None),
        })
    }

    fn out(&self, x: usize) -> usize {
        (x + 2 * self.pad - self.kernel) / self.stride + 1
    }
}

impl CustomOp1 for MaxPoolNhwc {
    fn name(&self) -> &'static str {
        "max-pool-nhwc"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("max-pool-nhwc: CUDA only (trainer::ops::nhwc has the CPU path)")
    }

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        bf16_input(xs, self.name())?;
        let (n, h, w, c) = xl.shape().dims4()?;
        if h + 2 * self.pad < self.kernel || w + 2 * self.pad < self.kernel {
            bail!(
                "max-pool nhwc: input {:?} smaller than the window",
                xl.shape()
            )
        }
        let (oh, ow) = (self.out(h), self.out(w));
        let dev = xs.device().clone();
        let len = n * oh * ow * c;
        let y = unsafe { alloc_storage(&dev, DType::BF16, len) }?;
        let idx = unsafe { alloc_storage(&dev, DType::U8, len) }?;
        let xp = storage_ptr(xs, xl)?;
        let yp = storage_ptr(&y, &Layout::contiguous(len))?;
        let ip = storage_ptr(&idx, &Layout::contiguous(len))?;
        let _t = super::profile::scope(&dev, "max-pool forward");
        let f = kernels::func(&dev, MODULE, "maxpool_fwd")?;
        let d = [n, h, w, c, oh, ow, self.kernel, self.stride, self.pad].map(|v| v as i32);
        let mut b = f.builder();
        b.arg(&xp);
        for v in &d {
            b.arg(v);
        }
        b.arg(&yp).arg(&ip);
        unsafe { b.launch(grid_1d(len, 256)) }.map_err(candle_core::Error::wrap)?;
        *self.argmax.lock().expect("argmax poisoned") =
            Some(tensor_from_storage(idx, (n, oh, ow, c)));
        Ok((y, Shape::from((n, oh, ow, c))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let idx = self
            .argmax
            .lock()
            .expect("argmax poisoned")
            .take()
            .ok_or_else(|| candle_core::Error::Msg("max-pool backward ran twice".into()))?;
        let dy = dy.to_dtype(DType::BF16)?.contiguous()?;
        let (n, h, w, c) = x.dims4()?;
        let (_, oh, ow, _) = dy.dims4()?;
        let dev = cuda_device(x)?;
        let len = n * h * w * c;
        let dx = unsafe { alloc_storage(&dev, DType::BF16, len) }?;
        let dxp = storage_ptr(&dx, &Layout::contiguous(len))?;
        let (dyp, ip) = (device_ptr(&dy)?, device_ptr(&idx)?);
        let _t = super::profile::scope(&dev, "max-pool backward");
        let f = kernels::func(&dev, MODULE, "maxpool_bwd")?;
        let d = [n, h, w, c, oh, ow, self.kernel, self.stride, self.pad].map(|v| v as i32);
        let mut b = f.builder();
        b.arg(&dyp).arg(&ip);
        for v in &d {
            b.arg(v);
        }
        b.arg(&dxp);
        unsafe { b.launch(grid_1d(len, 256)) }.map_err(candle_core::Error::wrap)?;
        Ok(Some(tensor_from_storage(dx, (n, h, w, c))))
    }
}

/// Global average pool `[N, H, W, C]` bf16 -> `[N, C]` f32.
#[derive(Clone, Copy, Debug)]
pub struct GlobalAvgPoolNhwc;

impl CustomOp1 for GlobalAvgPoolNhwc {
    fn name(&self) -> &'static str {
        "global-avg-pool-nhwc"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("global-avg-pool-nhwc: CUDA only (trainer::ops::nhwc has the CPU path)")
    }

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        bf16_input(xs, self.name())?;
        let (n, h, w, c) = xl.shape().dims4()?;
        let dev = xs.device().clone();
        let y = unsafe { alloc_storage(&dev, DType::F32, n * c) }?;
        let (xp, yp) = (
            storage_ptr(xs, xl)?,
            storage_ptr(&y, &Layout::contiguous(n * c))?,
        );
        let _t = super::profile::scope(&dev, "avg-pool forward");
        let f = kernels::func(&dev, MODULE, "gap_fwd")?;
        let (ni, hwi, ci) = (n as i32, (h * w) as i32, c as i32);
        let mut b = f.builder();
        b.arg(&xp).arg(&ni).arg(&hwi).arg(&ci).arg(&yp);
        unsafe { b.launch(grid_1d(n * c, 256)) }.map_err(candle_core::Error::wrap)?;
        Ok((y, Shape::from((n, c))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dy = dy.to_dtype(DType::F32)?.contiguous()?;
        let (n, h, w, c) = x.dims4()?;
        let dev = cuda_device(x)?;
        let len = n * h * w * c;
        let dx = unsafe { alloc_storage(&dev, DType::BF16, len) }?;
        let dxp = storage_ptr(&dx, &Layout::contiguous(len))?;
        let dyp = device_ptr(&dy)?;
        let _t = super::profile::scope(&dev, "avg-pool backward");
        let f = kernels::func(&dev, MODULE, "gap_bwd")?;
        let (ni, hwi, ci) = (n as i32, (h * w) as i32, c as i32);
        let mut b = f.builder();
        b.arg(&dyp).arg(&ni).arg(&hwi).arg(&ci).arg(&dxp);
        unsafe { b.launch(grid_1d(len, 256)) }.map_err(candle_core::Error::wrap)?;
        Ok(Some(tensor_from_storage(dx, (n, h, w, c))))
    }
}

/// `relu(a + b)` over two bf16 tensors of one shape.
#[derive(Clone, Copy, Debug)]
pub struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "add-relu"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("add-relu: CUDA only (trainer::ops::nhwc has the CPU path)")
    }

    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        bf16_input(a, self.name())?;
        bf16_input(b, self.name())?;
        if al.shape() != bl.shape() {
            bail!(
                "add-relu: shapes {:?} and {:?} differ",
                al.shape(),
                bl.shape()
            )
        }
        let n = al.shape().elem_count();
        let dev = a.device().clone();
        let y = unsafe { alloc_storage(&dev, DType::BF16, n) }?;
        let (ap, bp) = (storage_ptr(a, al)?, storage_ptr(b, bl)?);
        let yp = storage_ptr(&y, &Layout::contiguous(n))?;
        let _t = super::profile::scope(&dev, "add+relu forward");
        let f = kernels::func(&dev, MODULE, "add_relu_fwd")?;
        let ni = n as i64;
        let mut lb = f.builder();
        lb.arg(&ap).arg(&bp).arg(&ni).arg(&yp);
        unsafe { lb.launch(grid_1d(n, 256)) }.map_err(candle_core::Error::wrap)?;
        Ok((y, al.shape().clone()))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.to_dtype(DType::BF16)?.contiguous()?;
        let n = y.elem_count();
        let dev = cuda_device(y)?;
        let dx = unsafe { alloc_storage(&dev, DType::BF16, n) }?;
        let dxp = storage_ptr(&dx, &Layout::contiguous(n))?;
        let (yp, dyp) = (device_ptr(y)?, device_ptr(&dy)?);
        let _t = super::profile::scope(&dev, "add+relu backward");
        let f = kernels::func(&dev, MODULE, "relu_bwd")?;
        let ni = n as i64;
        let mut b = f.builder();
        b.arg(&yp).arg(&dyp).arg(&ni).arg(&dxp);
        unsafe { b.launch(grid_1d(n, 256)) }.map_err(candle_core::Error::wrap)?;
        let g = tensor_from_storage(dx, y.shape().clone());
        Ok((Some(g.clone()), Some(g)))
    }
}

/// `relu(a * scale[n] + b)` for bf16 NHWC `a`, `b` and per-sample bf16 scales `scale`
/// (`[N, 1, 1, 1]`, stochastic depth's mask): one pass where the unfused ops take two.
pub fn add_relu_scaled(a: &Tensor, b: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let (n_samples, per_sample) = scaled_shapes(a, b, scale)?;
    let n = n_samples * per_sample;
    let dev = cuda_device(a)?;
    let y = unsafe { alloc_storage(&dev, DType::BF16, n) }?;
    let yp = storage_ptr(&y, &Layout::contiguous(n))?;
    let (ap, bp, sp) = (device_ptr(a)?, device_ptr(b)?, device_ptr(scale)?);
    let _t = super::profile::scope(&dev, "add+relu forward");
    let f = kernels::func(&dev, MODULE, "add_relu_scaled_fwd")?;
    let (per, ni) = (per_sample as i64, n as i64);
    let mut lb = f.builder();
    lb.arg(&ap).arg(&bp).arg(&sp).arg(&per).arg(&ni).arg(&yp);
    unsafe { lb.launch(grid_1d(n, 256)) }.map_err(candle_core::Error::wrap)?;
    Ok(tensor_from_storage(y, a.shape().clone()))
}

/// The backward of [`add_relu_scaled`] from its output `y`: `(d_branch, d_shortcut)`.
pub fn add_relu_scaled_backward(
    y: &Tensor,
    dy: &Tensor,
    scale: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let dy = dy.to_dtype(DType::BF16)?.contiguous()?;
    let (n_samples, per_sample) = scaled_shapes(y, &dy, scale)?;
    let n = n_samples * per_sample;
    let dev = cuda_device(y)?;
    let d_short = unsafe { alloc_storage(&dev, DType::BF16, n) }?;
    let d_branch = unsafe { alloc_storage(&dev, DType::BF16, n) }?;
    let dsp = storage_ptr(&d_short, &Layout::contiguous(n))?;
    let dbp = storage_ptr(&d_branch, &Layout::contiguous(n))?;
    let (yp, dyp, sp) = (device_ptr(y)?, device_ptr(&dy)?, device_ptr(scale)?);
    let _t = super::profile::scope(&dev, "add+relu backward");
    let f = kernels::func(&dev, MODULE, "relu_scaled_bwd")?;
    let (per, ni) = (per_sample as i64, n as i64);
    let mut lb = f.builder();
    lb.arg(&yp)
        .arg(&dyp)
        .arg(&sp)
        .arg(&per)
        .arg(&ni)
        .arg(&dsp)
        .arg(&dbp);
    unsafe { lb.launch(grid_1d(n, 256)) }.map_err(candle_core::Error::wrap)?;
    Ok((
        tensor_from_storage(d_branch, y.shape().clone()),
        tensor_from_storage(d_short, y.shape().clone()),
    ))
}

/// `(samples, values per sample)` after checking `a`, `b` and `scale` fit together.
fn scaled_shapes(a: &Tensor, b: &Tensor, scale: &Tensor) -> Result<(usize, usize)> {
    for (t, what) in [(a, "input"), (b, "second input"), (scale, "scale")] {
        if t.dtype() != DType::BF16 || !t.is_contiguous() {
            bail!(
                "add-relu scaled: {what} must be contiguous bf16, got {:?}",
                t.dtype()
            )
        }
    }
    if a.shape() != b.shape() {
        bail!(
            "add-relu scaled: shapes {:?} and {:?} differ",
            a.shape(),
            b.shape()
        )
    }
    let n = a.dim(0)?;
    if scale.elem_count() != n {
        bail!(
            "add-relu scaled: {} scales for {n} samples",
            scale.elem_count()
        )
    }
    Ok((n, a.elem_count() / n.max(1)))
}
