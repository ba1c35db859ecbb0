//! BatchNorm on channels-last bf16 activations, optionally fused with the ReLU after it.
//!
//! A `[N, H, W, C]` contiguous tensor is an `[M, C]` matrix (`M = N * H * W`), so per-channel
//! statistics are column reductions. Training forward, three launches:
//! 1. `bn_stats_partial`: per chunk of rows, shifted sums `sum(x - k)` and `sum((x - k)^2)` with
//!    `k` the channel's first value (no cancellation when the mean is large against the spread);
//!    each thread owns two adjacent channels (32-bit loads) and 1/8 of the chunk's rows;
//! 2. `bn_stats_finalize`: per channel, the chunks summed in f64 in a fixed order (32 lanes of
//!    chunks, then a fixed tree over the lanes: the result does not depend on scheduling), mean,
//!    biased variance, `1 / sqrt(var + eps)`, the running statistics updated in place (PyTorch:
//!    unbiased variance, momentum 0.1), and the folded `scale = gamma * invstd`,
//!    `shift = beta - mean * scale`;
//! 3. `bn_apply`: `y = x * scale + shift` (ReLU), f32 maths, one rounding to bf16.
//!
//! Backward, three launches: partial sums of `g` and `g * xhat` (with `g = dy`, masked by `y > 0`
//! when the ReLU is fused); their fixed-order total (`dbeta`, `dgamma`) and per-channel
//! coefficients; and `dx = a * g + b * (x - mean) + c0`, which is
//! `gamma * invstd * (g - dbeta / M - xhat * dgamma / M)` with `a = gamma * invstd`,
//! `b = -a * invstd * dgamma / M`, `c0 = -a * dbeta / M`.
//!
//! The element-wise kernels (`bn_apply`, `bn_bwd_dx`) give each thread one group of channels for
//! all its rows, so the per-channel values are read once per thread and nothing is divided per
//! element; a group is 8 channels (16-byte loads and stores) when `C % 8 == 0` and the buffers
//! are 16-byte aligned, else 2 (4-byte accesses).
//!
//! The per-channel statistics of a forward are kept in the op (candle keeps the op alive in the
//! graph until the backward) instead of being recomputed.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::kernels::{self, Module};
use super::{alloc_storage, device_ptr, storage_ptr, tensor_from_storage};

/// The kernels of this module.
pub const MODULE: Module = Module {
    name: "rsb_batch_norm",
    source: r#"
#define TX 32
#define TY 8

extern "C" __global__ void bn_stats_partial(const bf16* x, int M, int C, int rows, float* part) {
    __shared__ float sh[4][TY][TX + 1];
    int tx = threadIdx.x, ty = threadIdx.y;
    int c = (blockIdx.x * TX + tx) * 2;
    int chunk = blockIdx.y;
    int r0 = chunk * rows;
    int r1 = min(M, r0 + rows);
    float s0 = 0.f, q0 = 0.f, s1 = 0.f, q1 = 0.f;
    if (c < C) {
        unsigned int kk = *(const unsigned int*)(x + c);
        float k0 = bf2f((bf16)(kk & 0xffffu)), k1 = bf2f((bf16)(kk >> 16));
        for (int r = r0 + ty; r < r1; r += TY) {
            unsigned int v = *(const unsigned int*)(x + (size_t)r * C + c);
            float a = bf2f((bf16)(v & 0xffffu)) - k0;
            float b = bf2f((bf16)(v >> 16)) - k1;
            s0 += a; q0 += a * a; s1 += b; q1 += b * b;
        }
    }
    sh[0][ty][tx] = s0; sh[1][ty][tx] = q0; sh[2][ty][tx] = s1; sh[3][ty][tx] = q1;
    __syncthreads();
    if (ty == 0 && c < C) {
        float S0 = 0.f, Q0 = 0.f, S1 = 0.f, Q1 = 0.f;
        for (int j = 0; j < TY; ++j) {
            S0 += sh[0][j][tx]; Q0 += sh[1][j][tx]; S1 += sh[2][j][tx]; Q1 += sh[3][j][tx];
        }
        float* s = part + (size_t)chunk * 2 * C;
        s[c] = S0; s[c + 1] = S1; s[C + c] = Q0; s[C + c + 1] = Q1;
    }
}

// The finishing reductions over chunks: block (FX channels, FY chunk lanes). Lane ty sums chunks
// ty, ty + FY, ... in order, then the lanes are added in a fixed tree: the same order whatever
// the scheduling. Coalesced: the FX threads of a lane read FX adjacent channels.
#define FX 32
#define FY 32

__device__ __forceinline__ void sum_chunks(const float* part, int chunks, int C, int c,
                                           double* s_out, double* q_out) {
    __shared__ double sh[2][FY][FX];
    int tx = threadIdx.x, ty = threadIdx.y;
    double s = 0.0, q = 0.0;
    if (c < C) {
        for (int i = ty; i < chunks; i += FY) {
            s += (double)part[(size_t)i * 2 * C + c];
            q += (double)part[(size_t)i * 2 * C + C + c];
        }
    }
    sh[0][ty][tx] = s;
    sh[1][ty][tx] = q;
    __syncthreads();
    for (int h = FY / 2; h > 0; h >>= 1) {
        if (ty < h) {
            sh[0][ty][tx] += sh[0][ty + h][tx];
            sh[1][ty][tx] += sh[1][ty + h][tx];
        }
        __syncthreads();
    }
    *s_out = sh[0][0][tx];
    *q_out = sh[1][0][tx];
}

// stats: [4][C] = mean, invstd, scale, shift.
extern "C" __global__ void bn_stats_finalize(
    const bf16* x, const float* part, int chunks, int M, int C, float eps, float momentum,
    float* running_mean, float* running_var, const float* gamma, const float* beta,
    float* stats) {
    int c = blockIdx.x * FX + threadIdx.x;
    double s, q;
    sum_chunks(part, chunks, C, c, &s, &q);
    if (threadIdx.y != 0 || c >= C) return;
    double k = (double)bf2f(x[c]);
    double dm = s / (double)M;
    double var = q / (double)M - dm * dm;
    if (var < 0.0) var = 0.0;
    float mean = (float)(k + dm);
    float invstd = 1.0f / sqrtf((float)var + eps);
    float unbiased = (float)(var * (double)M / (double)(M - 1));
    running_mean[c] = running_mean[c] * (1.0f - momentum) + mean * momentum;
    running_var[c] = running_var[c] * (1.0f - momentum) + unbiased * momentum;
    float sc = gamma[c] * invstd;
    stats[c] = mean;
    stats[C + c] = invstd;
    stats[2 * C + c] = sc;
    stats[3 * C + c] = beta[c] - mean * sc;
}

// The element-wise kernels give each thread one group of V channels for all its rows: thread t
// takes group t % G (G = C / V) and rows t / G, t / G + R, ... with R = (threads / G), so the
// per-channel values are loaded once per thread and no index is divided per element.
// `active` = R * G threads take part.

template <int V>
__device__ __forceinline__ void bn_apply_t(const bf16* x, const float* scale, const float* shift,
                                           int M, int C, int relu, bf16* y) {
    int G = C / V;
    int T = gridDim.x * blockDim.x;
    int R = T / G;
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= R * G) return;
    int c = (t % G) * V;
    float sc[V], sh[V];
#pragma unroll
    for (int j = 0; j < V; ++j) { sc[j] = scale[c + j]; sh[j] = shift[c + j]; }
    for (int r = t / G; r < M; r += R) {
        size_t o = (size_t)r * C + c;
        float v[V];
        load_bf<V>(x + o, v);
#pragma unroll
        for (int j = 0; j < V; ++j) {
            float a = v[j] * sc[j] + sh[j];
            v[j] = relu && a < 0.f ? 0.f : a;
        }
        store_bf<V>(y + o, v);
    }
}

extern "C" __global__ void bn_apply_v2(const bf16* x, const float* scale, const float* shift,
                                       int M, int C, int relu, bf16* y) {
    bn_apply_t<2>(x, scale, shift, M, C, relu, y);
}

extern "C" __global__ void bn_apply_v8(const bf16* x, const float* scale, const float* shift,
                                       int M, int C, int relu, bf16* y) {
    bn_apply_t<8>(x, scale, shift, M, C, relu, y);
}

extern "C" __global__ void bn_bwd_partial(const bf16* x, const bf16* y, const bf16* dy,
                                          const float* stats, int M, int C, int rows, int relu,
                                          float* part) {
    __shared__ float sh[4][TY][TX + 1];
    int tx = threadIdx.x, ty = threadIdx.y;
    int c = (blockIdx.x * TX + tx) * 2;
    int chunk = blockIdx.y;
    int r0 = chunk * rows;
    int r1 = min(M, r0 + rows);
    float g0 = 0.f, h0 = 0.f, g1 = 0.f, h1 = 0.f;
    if (c < C) {
        float m0 = stats[c], m1 = stats[c + 1], i0 = stats[C + c], i1 = stats[C + c + 1];
        for (int r = r0 + ty; r < r1; r += TY) {
            size_t o = (size_t)r * C + c;
            unsigned int xv = *(const unsigned int*)(x + o);
            unsigned int dv = *(const unsigned int*)(dy + o);
            float d0 = bf2f((bf16)(dv & 0xffffu)), d1 = bf2f((bf16)(dv >> 16));
            if (relu) {
                unsigned int yv = *(const unsigned int*)(y + o);
                if (!(bf2f((bf16)(yv & 0xffffu)) > 0.f)) d0 = 0.f;
                if (!(bf2f((bf16)(yv >> 16)) > 0.f)) d1 = 0.f;
            }
            g0 += d0; h0 += d0 * (bf2f((bf16)(xv & 0xffffu)) - m0) * i0;
            g1 += d1; h1 += d1 * (bf2f((bf16)(xv >> 16)) - m1) * i1;
        }
    }
    sh[0][ty][tx] = g0; sh[1][ty][tx] = h0; sh[2][ty][tx] = g1; sh[3][ty][tx] = h1;
    __syncthreads();
    if (ty == 0 && c < C) {
        float G0 = 0.f, H0 = 0.f, G1 = 0.f, H1 = 0.f;
        for (int j = 0; j < TY; ++j) {
            G0 += sh[0][j][tx]; H0 += sh[1][j][tx]; G1 += sh[2][j][tx]; H1 += sh[3][j][tx];
        }
        float* s = part + (size_t)chunk * 2 * C;
        s[c] = G0; s[c + 1] = G1; s[C + c] = H0; s[C + c + 1] = H1;
    }
}

// The chunk totals (dbeta = sum g, dgamma = sum g * xhat), and the per-channel coefficients of
// dx = a * g + b * (x - mean) + c0 (coef: [4][C] = a, b, mean, c0), from
// dx = gamma * invstd * (g - dbeta / M - xhat * dgamma / M).
extern "C" __global__ void bn_bwd_finalize(const float* part, int chunks, int M, int C,
                                           const float* stats, const float* gamma,
                                           float* dgamma, float* dbeta, float* coef) {
    int c = blockIdx.x * FX + threadIdx.x;
    double g, h;
    sum_chunks(part, chunks, C, c, &g, &h);
    if (threadIdx.y != 0 || c >= C) return;
    dbeta[c] = (float)g;
    dgamma[c] = (float)h;
    float invstd = stats[C + c];
    float k = gamma[c] * invstd;
    float inv_m = 1.0f / (float)M;
    coef[c] = k;
    coef[C + c] = -k * invstd * ((float)h * inv_m);
    coef[2 * C + c] = stats[c];
    coef[3 * C + c] = -k * ((float)g * inv_m);
}

template <int V>
__device__ __forceinline__ void bn_bwd_dx_t(const bf16* x, const bf16* y, const bf16* dy,
                                            const float* coef, int M, int C, int relu,
                                            bf16* dx) {
    int G = C / V;
    int T = gridDim.x * blockDim.x;
    int R = T / G;
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= R * G) return;
    int c = (t % G) * V;
    float a[V], b[V], mu[V], c0[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
        a[j] = coef[c + j];
        b[j] = coef[C + c + j];
        mu[j] = coef[2 * C + c + j];
        c0[j] = coef[3 * C + c + j];
    }
    for (int r = t / G; r < M; r += R) {
        size_t o = (size_t)r * C + c;
        float xv[V], d[V];
        load_bf<V>(x + o, xv);
        load_bf<V>(dy + o, d);
        if (relu) {
            float yv[V];
            load_bf<V>(y + o, yv);
#pragma unroll
            for (int j = 0; j < V; ++j)
                if (!(yv[j] > 0.f)) d[j] = 0.f;
        }
#pragma unroll
        for (int j = 0; j < V; ++j) d[j] = a[j] * d[j] + b[j] * (xv[j] - mu[j]) + c0[j];
        store_bf<V>(dx + o, d);
    }
}

extern "C" __global__ void bn_bwd_dx_v2(const bf16* x, const bf16* y, const bf16* dy,
                                        const float* coef, int M, int C, int relu, bf16* dx) {
    bn_bwd_dx_t<2>(x, y, dy, coef, M, C, relu, dx);
}

extern "C" __global__ void bn_bwd_dx_v8(const bf16* x, const bf16* y, const bf16* dy,
                                        const float* coef, int M, int C, int relu, bf16* dx) {
    bn_bwd_dx_t<8>(x, y, dy, coef, M, C, relu, dx);
}
"#,
};

const TX: usize = 32;
const TY: usize = 8;
const FX: usize = 32;
const FY: usize = 32;

/// Chunking of the `M` rows for the column reductions: enough blocks to fill the GPU.
fn chunking(m: usize, c: usize) -> (usize, usize) {
    let col_blocks = c.div_ceil(2 * TX);
    let want = 1024usize
        .div_ceil(col_blocks)
        .clamp(1, m.div_ceil(TY).max(1));
    let rows = m.div_ceil(want);
    (m.div_ceil(rows), rows)
}

/// The launch of the chunk-finishing kernels: FX channels by FY chunk lanes per block.
fn finalize_cfg(c: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (c.div_ceil(FX) as u32, 1, 1),
        block_dim: (FX as u32, FY as u32, 1),
        shared_mem_bytes: 0,
    }
}

/// The launch of the element-wise kernels over `m` rows of `groups` channel groups: every
/// thread keeps one group (see the kernels), so there are at least `groups` threads.
fn channel_group_cfg(m: usize, groups: usize) -> LaunchConfig {
    let threads = 256u32;
    let blocks = (m * groups).div_ceil(threads as usize).clamp(1, 132 * 16) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Channels per thread of the element-wise kernels: 8 (16-byte accesses) when the channel count
/// and every buffer allow it, else 2 (4-byte accesses).
fn vector_width(c: usize, ptrs: &[u64]) -> usize {
    if c.is_multiple_of(8) && ptrs.iter().all(|p| p.is_multiple_of(16)) {
        8
    } else {
        2
    }
}

fn check_input(x: &CudaStorage, xl: &Layout) -> Result<(usize, usize)> {
    if x.dtype() != DType::BF16 {
        bail!("batch norm nhwc: input must be bf16, got {:?}", x.dtype())
    }
    let dims = xl.shape().dims();
    let Some((&c, rest)) = dims.split_last() else {
        bail!("batch norm nhwc: scalar input")
    };
    let m: usize = rest.iter().product();
    if c % 2 != 0 || m < 2 {
        bail!(
            "batch norm nhwc: needs an even channel count and more than one value per channel, got {:?}",
            dims
        )
    }
    if !storage_ptr(x, xl)?.is_multiple_of(4) {
        bail!("batch norm nhwc: input not 4-byte aligned (a view with an odd offset?)")
    }
    Ok((m, c))
}

fn f32_param(s: &CudaStorage, l: &Layout, c: usize, what: &str) -> Result<u64> {
    if s.dtype() != DType::F32 || l.shape().dims() != [c] {
        bail!(
            "batch norm nhwc: {what} must be f32 [{c}], got {:?} {:?}",
            s.dtype(),
            l.shape()
        )
    }
    storage_ptr(s, l)
}

/// Launches `bn_apply` (`y = x * scale + shift`, optional ReLU) into a new bf16 storage.
fn apply(
    dev: &CudaDevice,
    x: u64,
    scale: u64,
    shift: u64,
    m: usize,
    c: usize,
    relu: bool,
) -> Result<CudaStorage> {
    let y = unsafe { alloc_storage(dev, DType::BF16, m * c) }?;
    let yp = storage_ptr(&y, &Layout::contiguous(m * c))?;
    let v = vector_width(c, &[x, yp]);
    let f = kernels::func(
        dev,
        MODULE,
        if v == 8 { "bn_apply_v8" } else { "bn_apply_v2" },
    )?;
    let (mi, ci, ri) = (m as i32, c as i32, relu as i32);
    let mut b = f.builder();
    b.arg(&x)
        .arg(&scale)
        .arg(&shift)
        .arg(&mi)
        .arg(&ci)
        .arg(&ri)
        .arg(&yp);
    unsafe { b.launch(channel_group_cfg(m, c / v)) }.map_err(candle_core::Error::wrap)?;
    Ok(y)
}

/// Training BatchNorm (+ ReLU): `(x, gamma, beta) -> y`, updating the running statistics.
#[derive(Debug)]
pub struct BatchNormTrain {
    /// Running mean (f32 `[C]`, updated in place).
    pub running_mean: Tensor,
    /// Running variance (f32 `[C]`, updated in place).
    pub running_var: Tensor,
    /// Epsilon.
    pub eps: f64,
    /// Momentum of the running statistics.
    pub momentum: f64,
    /// Fused ReLU.
    pub relu: bool,
    /// `[4, C]` mean, invstd, scale, shift of the forward, for the backward.
    saved: Mutex<Option<Tensor>>,
}

impl BatchNormTrain {
    /// A training BatchNorm over the given running statistics.
    pub fn new(
        running_mean: Tensor,
        running_var: Tensor,
        eps: f64,
        momentum: f64,
        relu: bool,
    ) -> Self {
        Self {
            running_mean,
            running_var,
            eps,
            momentum,
            relu,
            saved: Mutex::new(None),
        }
    }
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch-norm-nhwc-train"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("batch-norm-nhwc-train: CUDA only (trainer::ops::nhwc has the CPU path)")
    }

    #[allow(clippy::too_many_arguments)]
    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (m, c) = check_input(xs, xl)?;
        let dev = xs.device().clone();
        let xp = storage_ptr(xs, xl)?;
        let gp = f32_param(gs, gl, c, "gamma")?;
        let bp = f32_param(bs, bl, c, "beta")?;
        let rm = device_ptr(&self.running_mean)?;
        let rv = device_ptr(&self.running_var)?;
        let (chunks, rows) = chunking(m, c);
        let _t = super::profile::scope(&dev, "batch norm forward");

        let part = unsafe { dev.alloc::<f32>(chunks * 2 * c) }?;
        let f = kernels::func(&dev, MODULE, "bn_stats_partial")?;
        let (mi, ci, ri) = (m as i32, c as i32, rows as i32);
        let mut b = f.builder();
        b.arg(&xp).arg(&mi).arg(&ci).arg(&ri).arg(&part);
        let cfg = LaunchConfig {
            grid_dim: (c.div_ceil(2 * TX) as u32, chunks as u32, 1),
            block_dim: (TX as u32, TY as u32, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.map_err(candle_core::Error::wrap)?;

        let stats = unsafe { alloc_storage(&dev, DType::F32, 4 * c) }?;
        let sp = storage_ptr(&stats, &Layout::contiguous(4 * c))?;
        let f = kernels::func(&dev, MODULE, "bn_stats_finalize")?;
        let (chunks_i, eps, mom) = (chunks as i32, self.eps as f32, self.momentum as f32);
        let mut b = f.builder();
        b.arg(&xp)
            .arg(&part)
            .arg(&chunks_i)
            .arg(&mi)
            .arg(&ci)
            .arg(&eps)
            .arg(&mom);
        b.arg(&rm).arg(&rv).arg(&gp).arg(&bp).arg(&sp);
        unsafe { b.launch(finalize_cfg(c)) }.map_err(candle_core::Error::wrap)?;

        let y = apply(
            &dev,
            xp,
            sp + 8 * c as u64,
            sp + 12 * c as u64,
            m,
            c,
            self.relu,
        )?;
        *self.saved.lock().expect("bn stats poisoned") = Some(tensor_from_storage(stats, (4, c)));
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dgamma, dbeta) = self.backward(x, gamma, Some(y), dy)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

impl BatchNormTrain {
    /// `(dx, dgamma, dbeta)` of the forward that ran with this op: `x` its input, `gamma` (f32)
    /// its scale, `dy` the output gradient. The output `y` is needed only for the fused ReLU's
    /// mask; without the ReLU pass `None` (the kernels then never read it), so a caller need not
    /// keep the output alive for the backward.
    pub fn backward(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        y: Option<&Tensor>,
        dy: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let yp = match (y, self.relu) {
            (Some(y), _) => device_ptr(y)?,
            (None, false) => 0u64,
            (None, true) => bail!("batch norm backward: the fused ReLU needs the forward's output"),
        };
        let stats = self
            .saved
            .lock()
            .expect("bn stats poisoned")
            .take()
            .ok_or_else(|| candle_core::Error::Msg("batch norm backward ran twice".into()))?;
        let dy = dy.to_dtype(DType::BF16)?.contiguous()?;
        let dev = super::cuda_device(x)?;
        let c = gamma.dim(0)?;
        let m = x.elem_count() / c;
        let (xp, dyp) = (device_ptr(x)?, device_ptr(&dy)?);
        let (sp, gp) = (device_ptr(&stats)?, device_ptr(gamma)?);
        let (chunks, rows) = chunking(m, c);
        let relu = self.relu as i32;
        let (mi, ci, ri) = (m as i32, c as i32, rows as i32);
        let _t = super::profile::scope(&dev, "batch norm backward");

        let part = unsafe { dev.alloc::<f32>(chunks * 2 * c) }?;
        let f = kernels::func(&dev, MODULE, "bn_bwd_partial")?;
        let mut b = f.builder();
        b.arg(&xp)
            .arg(&yp)
            .arg(&dyp)
            .arg(&sp)
            .arg(&mi)
            .arg(&ci)
            .arg(&ri)
            .arg(&relu);
        b.arg(&part);
        let cfg = LaunchConfig {
            grid_dim: (c.div_ceil(2 * TX) as u32, chunks as u32, 1),
            block_dim: (TX as u32, TY as u32, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.map_err(candle_core::Error::wrap)?;

        let dgamma = unsafe { alloc_storage(&dev, DType::F32, c) }?;
        let dbeta = unsafe { alloc_storage(&dev, DType::F32, c) }?;
        let dgp = storage_ptr(&dgamma, &Layout::contiguous(c))?;
        let dbp = storage_ptr(&dbeta, &Layout::contiguous(c))?;
        let coef = unsafe { dev.alloc::<f32>(4 * c) }?;
        let f = kernels::func(&dev, MODULE, "bn_bwd_finalize")?;
        let chunks_i = chunks as i32;
        let mut b = f.builder();
        b.arg(&part)
            .arg(&chunks_i)
            .arg(&mi)
            .arg(&ci)
            .arg(&sp)
            .arg(&gp);
        b.arg(&dgp).arg(&dbp).arg(&coef);
        unsafe { b.launch(finalize_cfg(c)) }.map_err(candle_core::Error::wrap)?;

        let dx = unsafe { alloc_storage(&dev, DType::BF16, m * c) }?;
        let dxp = storage_ptr(&dx, &Layout::contiguous(m * c))?;
        let v = vector_width(c, &[xp, yp, dyp, dxp]);
        let f = kernels::func(
            &dev,
            MODULE,
            if v == 8 {
                "bn_bwd_dx_v8"
            } else {
                "bn_bwd_dx_v2"
            },
        )?;
        let mut b = f.builder();
        b.arg(&xp).arg(&yp).arg(&dyp).arg(&coef);
        b.arg(&mi).arg(&ci).arg(&relu).arg(&dxp);
        unsafe { b.launch(channel_group_cfg(m, c / v)) }.map_err(candle_core::Error::wrap)?;

        Ok((
            tensor_from_storage(dx, x.shape().clone()),
            tensor_from_storage(dgamma, c),
            tensor_from_storage(dbeta, c),
        ))
    }
}

/// Evaluation BatchNorm (+ ReLU) with a folded per-channel `scale` and `shift` (f32 `[C]`).
#[derive(Clone, Copy, Debug)]
pub struct BatchNormApply {
    /// Fused ReLU.
    pub relu: bool,
}

impl CustomOp3 for BatchNormApply {
    fn name(&self) -> &'static str {
        "batch-norm-nhwc-apply"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("batch-norm-nhwc-apply: CUDA only (trainer::ops::nhwc has the CPU path)")
    }

    #[allow(clippy::too_many_arguments)]
    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ss: &CudaStorage,
        sl: &Layout,
        hs: &CudaStorage,
        hl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (m, c) = check_input(xs, xl)?;
        let dev = xs.device().clone();
        let y = apply(
            &dev,
            storage_ptr(xs, xl)?,
            f32_param(ss, sl, c, "scale")?,
            f32_param(hs, hl, c, "shift")?,
            m,
            c,
            self.relu,
        )?;
        Ok((y, xl.shape().clone()))
    }
}
