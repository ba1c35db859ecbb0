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
//! * Channel attention's gate `x * g[n, c]` (squeeze-excite, ECA), one pass; its backward the
//!   same kernel on `dy` and a per-(sample, channel) sum of `x * dy` in f32.
//! * SiLU's gradient from its input in one pass (the forward is candle's `silu`).
//!
//! Each thread handles 8 adjacent values (16-byte loads and stores) when the channel count (the
//! element count for the plain add + ReLU) is a multiple of 8 and every buffer is 16-byte
//! aligned, else one; the per-sample kernels run one sample per grid row, so their index maths
//! stays in 32 bits within a sample.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::kernels::{self, grid_1d, Module};
use super::{alloc_storage, cuda_device, device_ptr, storage_ptr, tensor_from_storage};

/// The kernels of this module.
pub const MODULE: Module = Module {
    name: "rsb_pool",
    source: r#"
// Channels-last kernels over one sample per grid row (blockIdx.y = sample), V channels per
// thread (V = 8: 16-byte accesses when C % 8 == 0 and the buffers are 16-byte aligned; else 1);
// index maths in 32 bits within a sample.

template <int V>
__device__ __forceinline__ void maxpool_fwd_t(const bf16* x, int H, int W, int C, int OH, int OW,
                                              int k, int s, int p, bf16* y, u8* idx) {
    int G = C / V;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= OH * OW * G) return;
    int n = blockIdx.y;
    int c = (i % G) * V;
    int q = i / G;
    int ow = q % OW;
    int oh = q / OW;
    float best[V];
    int bi[V];
#pragma unroll
    for (int j = 0; j < V; ++j) { best[j] = 0.f; bi[j] = -1; }
    for (int kh = 0; kh < k; ++kh) {
        int ih = oh * s - p + kh;
        if (ih < 0 || ih >= H) continue;
        for (int kw = 0; kw < k; ++kw) {
            int iw = ow * s - p + kw;
            if (iw < 0 || iw >= W) continue;
            float v[V];
            load_bf<V>(x + (((size_t)n * H + ih) * W + iw) * C + c, v);
#pragma unroll
            for (int j = 0; j < V; ++j) {
                // A NaN wins (`v != v`), as in PyTorch and the CPU op.
                if (bi[j] < 0 || v[j] > best[j] || v[j] != v[j]) {
                    best[j] = v[j];
                    bi[j] = kh * k + kw;
                }
            }
        }
    }
    size_t o = (((size_t)n * OH + oh) * OW + ow) * C + c;
    store_bf<V>(y + o, best);
    U8Vec<V> iv;
#pragma unroll
    for (int j = 0; j < V; ++j) iv.b[j] = (u8)(bi[j] < 0 ? 0 : bi[j]);
    *(U8Vec<V>*)(idx + o) = iv;
}

extern "C" __global__ void maxpool_fwd_v1(const bf16* x, int H, int W, int C, int OH, int OW,
                                          int k, int s, int p, bf16* y, u8* idx) {
    maxpool_fwd_t<1>(x, H, W, C, OH, OW, k, s, p, y, idx);
}

extern "C" __global__ void maxpool_fwd_v8(const bf16* x, int H, int W, int C, int OH, int OW,
                                          int k, int s, int p, bf16* y, u8* idx) {
    maxpool_fwd_t<8>(x, H, W, C, OH, OW, k, s, p, y, idx);
}

template <int V>
__device__ __forceinline__ void maxpool_bwd_t(const bf16* dy, const u8* idx, int H, int W, int C,
                                              int OH, int OW, int k, int s, int p, bf16* dx) {
    int G = C / V;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= H * W * G) return;
    int n = blockIdx.y;
    int c = (i % G) * V;
    int q = i / G;
    int iw = q % W;
    int ih = q / W;
    int lo_h = ih + p - k + 1, lo_w = iw + p - k + 1;
    int oh0 = lo_h <= 0 ? 0 : (lo_h + s - 1) / s;
    int ow0 = lo_w <= 0 ? 0 : (lo_w + s - 1) / s;
    int oh1 = min(OH - 1, (ih + p) / s);
    int ow1 = min(OW - 1, (iw + p) / s);
    float acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = 0.f;
    for (int oh = oh0; oh <= oh1; ++oh) {
        for (int ow = ow0; ow <= ow1; ++ow) {
            size_t o = (((size_t)n * OH + oh) * OW + ow) * C + c;
            int want = (ih - (oh * s - p)) * k + (iw - (ow * s - p));
            float d[V];
            load_bf<V>(dy + o, d);
            U8Vec<V> iv = *(const U8Vec<V>*)(idx + o);
#pragma unroll
            for (int j = 0; j < V; ++j)
                if ((int)iv.b[j] == want) acc[j] += d[j];
        }
    }
    store_bf<V>(dx + (((size_t)n * H + ih) * W + iw) * C + c, acc);
}

extern "C" __global__ void maxpool_bwd_v1(const bf16* dy, const u8* idx, int H, int W, int C,
                                          int OH, int OW, int k, int s, int p, bf16* dx) {
    maxpool_bwd_t<1>(dy, idx, H, W, C, OH, OW, k, s, p, dx);
}

extern "C" __global__ void maxpool_bwd_v8(const bf16* dy, const u8* idx, int H, int W, int C,
                                          int OH, int OW, int k, int s, int p, bf16* dx) {
    maxpool_bwd_t<8>(dy, idx, H, W, C, OH, OW, k, s, p, dx);
}

extern "C" __global__ void gap_fwd(const bf16* x, int N, int HW, int C, float* y) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N * C) return;
    int c = i % C;
    int n = i / C;
    const bf16* px = x + (size_t)n * HW * C + c;
    float acc = 0.f;
    for (int j = 0; j < HW; ++j) acc += bf2f(px[(size_t)j * C]);
    y[i] = acc / (float)HW;
}

// dx[n, pixel, c] = dy[n, c] / HW: thread i of sample n writes channels (i % G) * V.. of pixel
// i / G, at offset i * V in the sample.
template <int V>
__device__ __forceinline__ void gap_bwd_t(const float* dy, int HW, int C, bf16* dx) {
    int G = C / V;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= HW * G) return;
    int n = blockIdx.y;
    int c = (i % G) * V;
    float out[V];
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = dy[(size_t)n * C + c + j] / (float)HW;
    store_bf<V>(dx + (size_t)n * HW * C + (size_t)i * V, out);
}

extern "C" __global__ void gap_bwd_v1(const float* dy, int HW, int C, bf16* dx) {
    gap_bwd_t<1>(dy, HW, C, dx);
}

extern "C" __global__ void gap_bwd_v8(const float* dy, int HW, int C, bf16* dx) {
    gap_bwd_t<8>(dy, HW, C, dx);
}

// Element-wise over `nv` vectors of V values.
template <int V>
__device__ __forceinline__ void add_relu_fwd_t(const bf16* a, const bf16* b, long long nv,
                                               bf16* y) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nv) return;
    float av[V], bv[V];
    load_bf<V>(a + i * V, av);
    load_bf<V>(b + i * V, bv);
#pragma unroll
    for (int j = 0; j < V; ++j) {
        float v = av[j] + bv[j];
        av[j] = v < 0.f ? 0.f : v;
    }
    store_bf<V>(y + i * V, av);
}

extern "C" __global__ void add_relu_fwd_v1(const bf16* a, const bf16* b, long long nv, bf16* y) {
    add_relu_fwd_t<1>(a, b, nv, y);
}

extern "C" __global__ void add_relu_fwd_v8(const bf16* a, const bf16* b, long long nv, bf16* y) {
    add_relu_fwd_t<8>(a, b, nv, y);
}

// dx = dy where y > 0, else 0 (dy's bits copied).
template <int V>
__device__ __forceinline__ void relu_bwd_t(const bf16* y, const bf16* dy, long long nv, bf16* dx) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nv) return;
    BfVec<V> yv = *(const BfVec<V>*)(y + i * V);
    BfVec<V> g = *(const BfVec<V>*)(dy + i * V);
#pragma unroll
    for (int j = 0; j < V; ++j)
        if (!(bf2f(yv.h[j]) > 0.f)) g.h[j] = (bf16)0;
    *(BfVec<V>*)(dx + i * V) = g;
}

extern "C" __global__ void relu_bwd_v1(const bf16* y, const bf16* dy, long long nv, bf16* dx) {
    relu_bwd_t<1>(y, dy, nv, dx);
}

extern "C" __global__ void relu_bwd_v8(const bf16* y, const bf16* dy, long long nv, bf16* dx) {
    relu_bwd_t<8>(y, dy, nv, dx);
}

// relu(a * scale[sample] + b): a residual block's end with stochastic depth folded in. The
// product is rounded to bf16 first, so this equals the unfused bf16 multiply, then add + ReLU.
// One sample per grid row, `per_vec` vectors of V values per sample.
template <int V>
__device__ __forceinline__ void add_relu_scaled_fwd_t(const bf16* a, const bf16* b,
                                                      const bf16* scale, int per_vec, bf16* y) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= per_vec) return;
    size_t o = ((size_t)blockIdx.y * per_vec + i) * V;
    float s = bf2f(scale[blockIdx.y]);
    float av[V], bv[V];
    load_bf<V>(a + o, av);
    load_bf<V>(b + o, bv);
#pragma unroll
    for (int j = 0; j < V; ++j) {
        float v = bf2f(f2bf(av[j] * s)) + bv[j];
        av[j] = v < 0.f ? 0.f : v;
    }
    store_bf<V>(y + o, av);
}

extern "C" __global__ void add_relu_scaled_fwd_v1(const bf16* a, const bf16* b,
                                                  const bf16* scale, int per_vec, bf16* y) {
    add_relu_scaled_fwd_t<1>(a, b, scale, per_vec, y);
}

extern "C" __global__ void add_relu_scaled_fwd_v8(const bf16* a, const bf16* b,
                                                  const bf16* scale, int per_vec, bf16* y) {
    add_relu_scaled_fwd_t<8>(a, b, scale, per_vec, y);
}

// Its backward: the shortcut's gradient g = relu'(y) * dy and the branch's g * scale[sample].
template <int V>
__device__ __forceinline__ void relu_scaled_bwd_t(const bf16* y, const bf16* dy,
                                                  const bf16* scale, int per_vec,
                                                  bf16* d_short, bf16* d_branch) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= per_vec) return;
    size_t o = ((size_t)blockIdx.y * per_vec + i) * V;
    float s = bf2f(scale[blockIdx.y]);
    BfVec<V> yv = *(const BfVec<V>*)(y + o);
    BfVec<V> g = *(const BfVec<V>*)(dy + o);
    BfVec<V> gb;
#pragma unroll
    for (int j = 0; j < V; ++j) {
        if (!(bf2f(yv.h[j]) > 0.f)) g.h[j] = (bf16)0;
        gb.h[j] = f2bf(bf2f(g.h[j]) * s);
    }
    *(BfVec<V>*)(d_short + o) = g;
    *(BfVec<V>*)(d_branch + o) = gb;
}

extern "C" __global__ void relu_scaled_bwd_v1(const bf16* y, const bf16* dy, const bf16* scale,
                                              int per_vec, bf16* d_short, bf16* d_branch) {
    relu_scaled_bwd_t<1>(y, dy, scale, per_vec, d_short, d_branch);
}

extern "C" __global__ void relu_scaled_bwd_v8(const bf16* y, const bf16* dy, const bf16* scale,
                                              int per_vec, bf16* d_short, bf16* d_branch) {
    relu_scaled_bwd_t<8>(y, dy, scale, per_vec, d_short, d_branch);
}

// Channel attention's gate: y[n, pixel, c] = x[n, pixel, c] * g[n, c], the f32 product of two
// bf16 values (exact) rounded once to bf16, as candle's bf16 multiply. One sample per grid row;
// thread i of sample n handles channels (i % G) * V.. of pixel i / G. With x = dy it is also the
// input gradient.
template <int V>
__device__ __forceinline__ void chan_scale_t(const bf16* x, const bf16* g, int HW, int C,
                                             bf16* y) {
    int G = C / V;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= HW * G) return;
    int n = blockIdx.y;
    int c = (i % G) * V;
    size_t o = (size_t)n * HW * C + (size_t)i * V;
    float v[V];
    load_bf<V>(x + o, v);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] *= bf2f(g[(size_t)n * C + c + j]);
    store_bf<V>(y + o, v);
}

extern "C" __global__ void chan_scale_v1(const bf16* x, const bf16* g, int HW, int C, bf16* y) {
    chan_scale_t<1>(x, g, HW, C, y);
}

extern "C" __global__ void chan_scale_v8(const bf16* x, const bf16* g, int HW, int C, bf16* y) {
    chan_scale_t<8>(x, g, HW, C, y);
}

// The gate's gradient dg[n, c] = sum over the sample's pixels of x * dy, in f32 in pixel order:
// one thread per (sample, channel), as gap_fwd.
extern "C" __global__ void chan_scale_dg(const bf16* x, const bf16* dy, int N, int HW, int C,
                                         float* dg) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N * C) return;
    int c = i % C;
    int n = i / C;
    size_t base = (size_t)n * HW * C + c;
    float acc = 0.f;
    for (int j = 0; j < HW; ++j) {
        size_t o = base + (size_t)j * C;
        acc += bf2f(x[o]) * bf2f(dy[o]);
    }
    dg[i] = acc;
}

// SiLU's gradient from its input: dx = dy * s * (1 + x * (1 - s)), s = 1 / (1 + exp(-x)), in
// f32, rounded once to bf16. Element-wise over `nv` vectors of V values.
template <int V>
__device__ __forceinline__ void silu_bwd_t(const bf16* x, const bf16* dy, long long nv,
                                           bf16* dx) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nv) return;
    float xv[V], g[V];
    load_bf<V>(x + i * V, xv);
    load_bf<V>(dy + i * V, g);
#pragma unroll
    for (int j = 0; j < V; ++j) {
        float s = 1.f / (1.f + expf(-xv[j]));
        g[j] = g[j] * (s * (1.f + xv[j] * (1.f - s)));
    }
    store_bf<V>(dx + i * V, g);
}

extern "C" __global__ void silu_bwd_v1(const bf16* x, const bf16* dy, long long nv, bf16* dx) {
    silu_bwd_t<1>(x, dy, nv, dx);
}

extern "C" __global__ void silu_bwd_v8(const bf16* x, const bf16* dy, long long nv, bf16* dx) {
    silu_bwd_t<8>(x, dy, nv, dx);
}
"#,
};

fn bf16_input(s: &CudaStorage, what: &str) -> Result<()> {
    if s.dtype() != DType::BF16 {
        bail!("{what}: input must be bf16, got {:?}", s.dtype())
    }
    Ok(())
}

/// Values per thread: 8 (16-byte accesses) when `c` is a multiple of 8 and every buffer is
/// 16-byte aligned, else 1.
fn width(c: usize, ptrs: &[u64]) -> usize {
    if c.is_multiple_of(8) && ptrs.iter().all(|p| p.is_multiple_of(16)) {
        8
    } else {
        1
    }
}

/// One sample per grid row (`blockIdx.y`), `per_sample` threads in each.
fn per_sample_cfg(per_sample: usize, samples: usize) -> Result<LaunchConfig> {
    if samples > 65535 || per_sample > i32::MAX as usize {
        bail!("cuda op: {samples} samples of {per_sample} items exceed the launch grid")
    }
    Ok(LaunchConfig {
        grid_dim: (
            per_sample.div_ceil(256).max(1) as u32,
            samples.max(1) as u32,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
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
        let v = width(c, &[xp, yp]);
        let f = kernels::func(
            &dev,
            MODULE,
            if v == 8 {
                "maxpool_fwd_v8"
            } else {
                "maxpool_fwd_v1"
            },
        )?;
        let d = [h, w, c, oh, ow, self.kernel, self.stride, self.pad].map(|v| v as i32);
        let mut b = f.builder();
        b.arg(&xp);
        for v in &d {
            b.arg(v);
        }
        b.arg(&yp).arg(&ip);
        unsafe { b.launch(per_sample_cfg(oh * ow * c / v, n)?) }
            .map_err(candle_core::Error::wrap)?;
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
        let v = width(c, &[dyp, dxp]);
        let f = kernels::func(
            &dev,
            MODULE,
            if v == 8 {
                "maxpool_bwd_v8"
            } else {
                "maxpool_bwd_v1"
            },
        )?;
        let d = [h, w, c, oh, ow, self.kernel, self.stride, self.pad].map(|v| v as i32);
        let mut b = f.builder();
        b.arg(&dyp).arg(&ip);
        for v in &d {
            b.arg(v);
        }
        b.arg(&dxp);
        unsafe { b.launch(per_sample_cfg(h * w * c / v, n)?) }.map_err(candle_core::Error::wrap)?;
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
        let v = width(c, &[dxp]);
        let f = kernels::func(
            &dev,
            MODULE,
            if v == 8 { "gap_bwd_v8" } else { "gap_bwd_v1" },
        )?;
        let (hwi, ci) = ((h * w) as i32, c as i32);
        let mut b = f.builder();
        b.arg(&dyp).arg(&hwi).arg(&ci).arg(&dxp);
        unsafe { b.launch(per_sample_cfg(h * w * c / v, n)?) }.map_err(candle_core::Error::wrap)?;
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
        let v = width(n, &[ap, bp, yp]);
        let f = kernels::func(
            &dev,
            MODULE,
            if v == 8 {
                "add_relu_fwd_v8"
            } else {
                "add_relu_fwd_v1"
            },
        )?;
        let nv = (n / v) as i64;
        let mut lb = f.builder();
        lb.arg(&ap).arg(&bp).arg(&nv).arg(&yp);
        unsafe { lb.launch(grid_1d(n / v, 256)) }.map_err(candle_core::Error::wrap)?;
        Ok((y, al.shape().clone()))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let names = ["relu_bwd_v8", "relu_bwd_v1"];
        let g = elementwise_grad(y, dy, names, "add+relu backward")?;
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
    let v = width(per_sample, &[ap, bp, yp]);
    let f = kernels::func(
        &dev,
        MODULE,
        if v == 8 {
            "add_relu_scaled_fwd_v8"
        } else {
            "add_relu_scaled_fwd_v1"
        },
    )?;
    let per_vec = (per_sample / v) as i32;
    let mut lb = f.builder();
    lb.arg(&ap).arg(&bp).arg(&sp).arg(&per_vec).arg(&yp);
    unsafe { lb.launch(per_sample_cfg(per_sample / v, n_samples)?) }
        .map_err(candle_core::Error::wrap)?;
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
    let v = width(per_sample, &[yp, dyp, dsp, dbp]);
    let f = kernels::func(
        &dev,
        MODULE,
        if v == 8 {
            "relu_scaled_bwd_v8"
        } else {
            "relu_scaled_bwd_v1"
        },
    )?;
    let per_vec = (per_sample / v) as i32;
    let mut lb = f.builder();
    lb.arg(&yp)
        .arg(&dyp)
        .arg(&sp)
        .arg(&per_vec)
        .arg(&dsp)
        .arg(&dbp);
    unsafe { lb.launch(per_sample_cfg(per_sample / v, n_samples)?) }
        .map_err(candle_core::Error::wrap)?;
    Ok((
        tensor_from_storage(d_branch, y.shape().clone()),
        tensor_from_storage(d_short, y.shape().clone()),
    ))
}

/// Channel attention's gate `x * gate[n, c]` for a bf16 NHWC `x` and a bf16 `[N, C]` gate (one
/// pass; candle's broadcast multiply gives the same bits); the backward is
/// [`channel_scale_backward`].
#[derive(Clone, Copy, Debug)]
pub struct ChannelScale;

impl CustomOp2 for ChannelScale {
    fn name(&self) -> &'static str {
        "channel-scale"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("channel-scale: CUDA only (trainer::ops::nhwc has the CPU path)")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        bf16_input(x, self.name())?;
        bf16_input(g, self.name())?;
        let (n, h, w, c) = xl.shape().dims4()?;
        if gl.shape().dims() != [n, c] {
            bail!(
                "channel-scale: gate {:?} does not fit input {:?} (expected [{n}, {c}])",
                gl.shape(),
                xl.shape()
            )
        }
        let len = n * h * w * c;
        let dev = x.device().clone();
        let y = unsafe { alloc_storage(&dev, DType::BF16, len) }?;
        let (xp, gp) = (storage_ptr(x, xl)?, storage_ptr(g, gl)?);
        let yp = storage_ptr(&y, &Layout::contiguous(len))?;
        let _t = super::profile::scope(&dev, "channel scale forward");
        chan_scale_launch(&dev, (xp, gp, yp), (n, h * w, c))?;
        Ok((y, xl.shape().clone()))
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

/// `y = x * g[n, c]` over `(samples, pixels, channels)`, from device pointers `(x, g, y)`.
fn chan_scale_launch(
    dev: &candle_core::cuda_backend::CudaDevice,
    (xp, gp, yp): (u64, u64, u64),
    (n, hw, c): (usize, usize, usize),
) -> Result<()> {
    let v = width(c, &[xp, yp]);
    let f = kernels::func(
        dev,
        MODULE,
        if v == 8 {
            "chan_scale_v8"
        } else {
            "chan_scale_v1"
        },
    )?;
    let (hwi, ci) = (hw as i32, c as i32);
    let mut b = f.builder();
    b.arg(&xp).arg(&gp).arg(&hwi).arg(&ci).arg(&yp);
    unsafe { b.launch(per_sample_cfg(hw * c / v, n)?) }.map_err(candle_core::Error::wrap)?;
    Ok(())
}

/// The gradients of [`ChannelScale`] at `(x, gate)` from `dy`: `dx = dy * gate` (bf16) and
/// `dgate[n, c]`, the f32 sum over the sample's pixels of `x * dy`, returned in bf16.
pub fn channel_scale_backward(x: &Tensor, gate: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let x = x.to_dtype(DType::BF16)?.contiguous()?;
    let gate = gate.to_dtype(DType::BF16)?.contiguous()?;
    let dy = dy.to_dtype(DType::BF16)?.contiguous()?;
    let (n, h, w, c) = x.dims4()?;
    if gate.dims() != [n, c] || dy.dims() != x.dims() {
        bail!(
            "channel-scale backward: input {:?}, gate {:?}, gradient {:?}",
            x.dims(),
            gate.dims(),
            dy.dims()
        )
    }
    let len = n * h * w * c;
    let dev = cuda_device(&x)?;
    let dx = unsafe { alloc_storage(&dev, DType::BF16, len) }?;
    let dg = unsafe { alloc_storage(&dev, DType::F32, n * c) }?;
    let dxp = storage_ptr(&dx, &Layout::contiguous(len))?;
    let dgp = storage_ptr(&dg, &Layout::contiguous(n * c))?;
    let (xp, gp, dyp) = (device_ptr(&x)?, device_ptr(&gate)?, device_ptr(&dy)?);
    let _t = super::profile::scope(&dev, "channel scale backward");
    chan_scale_launch(&dev, (dyp, gp, dxp), (n, h * w, c))?;
    let f = kernels::func(&dev, MODULE, "chan_scale_dg")?;
    let (ni, hwi, ci) = (n as i32, (h * w) as i32, c as i32);
    let mut b = f.builder();
    b.arg(&xp).arg(&dyp).arg(&ni).arg(&hwi).arg(&ci).arg(&dgp);
    unsafe { b.launch(grid_1d(n * c, 256)) }.map_err(candle_core::Error::wrap)?;
    Ok((
        tensor_from_storage(dx, x.shape().clone()),
        tensor_from_storage(dg, (n, c)).to_dtype(DType::BF16)?,
    ))
}

/// SiLU's input gradient for a bf16 input `x` (any shape) from `dy`, in one pass (candle's own
/// SiLU backward is about six tensor operations).
pub fn silu_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(DType::BF16)?.contiguous()?;
    elementwise_grad(&x, dy, ["silu_bwd_v8", "silu_bwd_v1"], "silu backward")
}

/// `dx` from a saved bf16 tensor `saved` (an output or an input of the layer) and `dy`, by an
/// element-wise kernel over `nv` vectors of 8 values (`names[0]`) or of 1 (`names[1]`)
/// taking `(saved, dy, nv, dx)`.
fn elementwise_grad(
    saved: &Tensor,
    dy: &Tensor,
    names: [&'static str; 2],
    what: &'static str,
) -> Result<Tensor> {
    let dy = dy.to_dtype(DType::BF16)?.contiguous()?;
    if saved.shape() != dy.shape() {
        bail!(
            "{what}: saved tensor {:?} and gradient {:?} differ",
            saved.dims(),
            dy.dims()
        )
    }
    let n = saved.elem_count();
    let dev = cuda_device(saved)?;
    let dx = unsafe { alloc_storage(&dev, DType::BF16, n) }?;
    let dxp = storage_ptr(&dx, &Layout::contiguous(n))?;
    let (sp, dyp) = (device_ptr(saved)?, device_ptr(&dy)?);
    let _t = super::profile::scope(&dev, what);
    let v = width(n, &[sp, dyp, dxp]);
    let f = kernels::func(&dev, MODULE, if v == 8 { names[0] } else { names[1] })?;
    let nv = (n / v) as i64;
    let mut b = f.builder();
    b.arg(&sp).arg(&dyp).arg(&nv).arg(&dxp);
    unsafe { b.launch(grid_1d(n / v, 256)) }.map_err(candle_core::Error::wrap)?;
    Ok(tensor_from_storage(dx, saved.shape().clone()))
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
