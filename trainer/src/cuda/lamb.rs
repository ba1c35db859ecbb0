//! LAMB on the GPU with a fixed number of kernel launches per step, whatever the number of
//! parameter tensors: the CUDA counterpart of [`crate::optim::Lamb`], with the same maths, the
//! same [`TrainOptimizer`] behaviour and the same checkpoint keys.
//!
//! # Construction
//!
//! ```ignore
//! // `groups` as for the CPU optimizer: f32 master `Var`s on one CUDA device.
//! let groups = trainer::optim::param_groups(named_vars, recipe.optim.weight_decay);
//! let mut opt = trainer::cuda::lamb::CudaLamb::new(groups, recipe.lamb_config())?;
//! let report = opt.step(&grads, lr)?; // grads: f32 gradients of those Vars
//! ```
//!
//! Which optimizer a run uses (this one on CUDA, [`crate::optim::Lamb`] elsewhere) is the
//! caller's choice; both implement [`TrainOptimizer`] and their states load into each other.
//!
//! # Layout and kernels
//!
//! All parameters (groups in order, parameters in order) are numbered `0..n`. The moments live in
//! two flat f32 device buffers (`exp_avg`, `exp_avg_sq`), parameter `i` at `offset[i]`. Every
//! parameter is cut into chunks of at most [`CHUNK_ELEMS`] elements; the chunk list
//! `(tensor, start, len)` is built and uploaded once. Master parameters stay candle `Var`s and
//! are written in place through their device addresses, so their storage is never replaced.
//!
//! One step is, on candle's stream:
//! 1. one host-to-device copy of the pointer table (parameter and gradient address per tensor,
//!    0 for a tensor without gradient) from pinned memory;
//! 2. `lamb_grad_sumsq` (one block per chunk): Σ g² of the chunk;
//! 3. `lamb_global_norm` (one block): the chunk partials summed in a fixed order in f64, the
//!    global norm, the non-finite test and the clip factor, into a small device buffer that the
//!    next two kernels read (a non-finite norm makes them return at once: the skip decision never
//!    leaves the device);
//! 4. `lamb_moments` (one block per chunk): clipped gradient, new `m` and `v`, the update
//!    direction `u`, and the chunk's Σ w² and Σ u² for the trust ratio;
//! 5. `lamb_apply` (one block per chunk): the tensor's trust ratio from its chunk partials (fixed
//!    order, f64; each block of a tensor computes the same value), `u` recomputed from the new moments (same device function, so the same
//!    value), `w -= lr · trust · u`;
//! 6. one asynchronous device-to-host copy of (norm, clip factor, skip flag) into pinned memory,
//!    and an event after it.
//!
//! So four kernel launches and two copies per step, and no wait: the host reads the report (and
//! counts the step) when it queues the next update, or when the training loop asks for it
//! ([`TrainOptimizer::last_report`], once per metrics line), by which time the GPU has normally
//! finished it. Reading it earlier, right after queueing, would make the host wait until the
//! whole step (backward included) has run and leave the GPU idle while the host queues the next
//! forward pass. Waiting for update `k - 1` when queueing update `k` also keeps the host at most
//! one step ahead of the device. There are no float atomics: each reduction has a fixed order, so
//! two runs from the same state give bit-identical results.
//!
//! # Agreement with the CPU optimizer
//!
//! The element-wise maths is the CPU implementation's, operation by operation, in f32 with the
//! same f64-to-f32 conversions of the scalars (candle's `affine` computes `x·mul + add` with
//! `mul`, `add` cast to f32), and with explicitly rounded intrinsics (`__fmul_rn`, `__fadd_rn`,
//! `__fdiv_rn`, `__fsqrt_rn`), so no multiply-add is contracted. Given the same clip factor and
//! trust ratio, `m`, `v` and `w` are therefore bit-identical to the CPU's. The sums are not: the
//! global squared norm is summed per chunk in f32 and across chunks in f64 (the CPU sums each
//! tensor in f32, then tensors in f64), and the trust-ratio norms per chunk in f32 and across a
//! tensor's chunks in f64 (the CPU sums each tensor in f32). The norms thus differ by about 1e-7
//! relative, which moves the clip factor and trust ratios by as much and the results by an ulp
//! or two. Measured without a GPU by running these kernels' source on the CPU
//! (`trainer/tests/lamb_emu.rs`: the source compiled as C++ with `g++`, the threads of a block as
//! fibers that switch at `__syncthreads`) against [`crate::optim::Lamb`] over the parameters and
//! step schedule of `trainer/tests/cuda_lamb.rs`: bit-identical parameters and moments when
//! neither clipping nor the trust ratio is in play, otherwise at most 3e-7 of each tensor's
//! largest magnitude after six steps. The GPU tests allow 1e-5 of it.
//!
//! The non-finite test is on the f64 sum of per-chunk f32 sums of squares; the CPU's is on the
//! f64 sum of per-tensor f32 sums. For finite gradients with a squared norm near the f32 limit
//! (|g| of about 1e19) one may skip a step that the other applies.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::backprop::GradStore;
use candle_core::cuda_backend::cudarc::driver::{
    CudaEvent, CudaSlice, CudaStream, LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Device, Storage, Tensor};

use super::kernels::{self, Kernel, Module};
use crate::optim::{
    check_groups, check_keys, read_moment, read_step, step_tensor, LambConfig, OptimError,
    ParamGroup, StepReport, TrainOptimizer, STEP_KEY,
};

/// Elements per chunk: one thread block of the per-chunk kernels handles this many (64 KiB of
/// f32 per array). ResNet-50 (25.6 M parameters in 161 tensors) makes about 1,700 chunks.
pub const CHUNK_ELEMS: usize = 16384;

/// Threads per block of every kernel here (a power of two: the block reductions halve it).
const THREADS: u32 = 256;

/// The kernels. The element-wise maths mirrors `optim/lamb.rs` operation by operation.
pub const MODULE: Module = Module {
    name: "lamb",
    source: r#"
#define THREADS 256
typedef unsigned long long u64;

// Block-wide sum with a fixed order (tree over shared memory). Every thread gets the result.
__device__ float block_sum_f32(float v, float* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (unsigned int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] = __fadd_rn(sh[threadIdx.x], sh[threadIdx.x + s]);
        __syncthreads();
    }
    float r = sh[0];
    __syncthreads();
    return r;
}

__device__ double block_sum_f64(double v, double* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (unsigned int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] = __dadd_rn(sh[threadIdx.x], sh[threadIdx.x + s]);
        __syncthreads();
    }
    double r = sh[0];
    __syncthreads();
    return r;
}

// The update direction of one element, given its new moments and weight:
// u = (m * (1/bc1)) / (sqrt(v) * (1/sqrt(bc2)) + eps), then u += w * wd when wd != 0.
__device__ __forceinline__ float lamb_direction(float m, float v, float w, float inv_bc1,
                                                float inv_bc2_sqrt, float eps, float wd) {
    float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(v), inv_bc2_sqrt), eps);
    float u = __fdiv_rn(__fmul_rn(m, inv_bc1), denom);
    if (wd != 0.0f) u = __fadd_rn(u, __fmul_rn(w, wd));
    return u;
}

// scalars (f64): [0] global norm, [1] clip factor, [2] 1 / clip factor, [3] skip (1: non-finite).

// One block per chunk: partial[c] = sum of g^2 over the chunk (0 for a tensor without gradient).
// chunks: 3 u32 per chunk (tensor, start within the tensor, length).
extern "C" __global__ void lamb_grad_sumsq(const unsigned int* chunks, const u64* grads,
                                           float* partial) {
    __shared__ float sh[THREADS];
    unsigned int c = blockIdx.x;
    unsigned int t = chunks[3 * c], start = chunks[3 * c + 1], len = chunks[3 * c + 2];
    const float* g = (const float*)grads[t];
    float acc = 0.0f;
    if (g != 0) {
        for (unsigned int i = threadIdx.x; i < len; i += blockDim.x) {
            float x = g[start + i];
            acc = __fadd_rn(acc, __fmul_rn(x, x));
        }
    }
    float s = block_sum_f32(acc, sh);
    if (threadIdx.x == 0) partial[c] = s;
}

// One block: the global norm from the chunk partials (summed in f64, fixed order), the skip flag
// and the clip factor (clip only when has_max and norm > max_norm, as the CPU optimizer).
extern "C" __global__ void lamb_global_norm(const float* partial, unsigned int num_chunks,
                                            int has_max, double max_norm, double* scalars) {
    __shared__ double sh[THREADS];
    double acc = 0.0;
    for (unsigned int i = threadIdx.x; i < num_chunks; i += blockDim.x) {
        acc = __dadd_rn(acc, (double)partial[i]);
    }
    double sumsq = block_sum_f64(acc, sh);
    if (threadIdx.x == 0) {
        double norm = sqrt(sumsq);
        int finite = isfinite(norm);
        double clip = (finite && has_max && norm > max_norm) ? norm / max_norm : 1.0;
        scalars[0] = norm;
        scalars[1] = clip;
        scalars[2] = 1.0 / clip;
        scalars[3] = finite ? 0.0 : 1.0;
    }
}

// One block per chunk: new moments, written in place, and the chunk's sums of w^2 and u^2 (for
// tensors with a trust ratio; adapt[t] != 0).
extern "C" __global__ void lamb_moments(
    const unsigned int* chunks, const u64* params, const u64* grads, const u64* offsets,
    const float* wds, const int* adapt, float* exp_avg, float* exp_avg_sq,
    const double* scalars, float beta1, float beta3, float beta2, float one_minus_beta2,
    float inv_bc1, float inv_bc2_sqrt, float eps, float* w_sumsq, float* u_sumsq) {
    __shared__ float sh[THREADS];
    if (scalars[3] != 0.0) return;
    unsigned int c = blockIdx.x;
    unsigned int t = chunks[3 * c], start = chunks[3 * c + 1], len = chunks[3 * c + 2];
    const float* g = (const float*)grads[t];
    if (g == 0) return;  // uniform per block, so no thread waits at a barrier below
    const float* w = (const float*)params[t];
    float* m = exp_avg + offsets[t];
    float* v = exp_avg_sq + offsets[t];
    float inv_clip = (float)scalars[2];
    float wd = wds[t];
    int ad = adapt[t];
    float wacc = 0.0f, uacc = 0.0f;
    for (unsigned int i = start + threadIdx.x; i < start + len; i += blockDim.x) {
        float gi = __fmul_rn(g[i], inv_clip);
        float mi = __fadd_rn(__fmul_rn(m[i], beta1), __fmul_rn(gi, beta3));
        float vi = __fadd_rn(__fmul_rn(v[i], beta2), __fmul_rn(__fmul_rn(gi, gi), one_minus_beta2));
        m[i] = mi;
        v[i] = vi;
        if (ad) {
            float wi = w[i];
            float u = lamb_direction(mi, vi, wi, inv_bc1, inv_bc2_sqrt, eps, wd);
            wacc = __fadd_rn(wacc, __fmul_rn(wi, wi));
            uacc = __fadd_rn(uacc, __fmul_rn(u, u));
        }
    }
    if (ad) {
        float ws = block_sum_f32(wacc, sh);
        float us = block_sum_f32(uacc, sh);
        if (threadIdx.x == 0) {
            w_sumsq[c] = ws;
            u_sumsq[c] = us;
        }
    }
}

// One block per chunk: trust ratio of the chunk's tensor (its chunks' partials summed in f64 in
// a fixed order; every block of the tensor gets the same value), then w -= (u * trust) * lr_t with u recomputed from the new moments
// and lr_t = lr * lr_scales[t] (the tensor's group factor) rounded to f32.
// tensor_chunks: 2 u32 per tensor (first chunk, number of chunks).
extern "C" __global__ void lamb_apply(
    const unsigned int* chunks, const unsigned int* tensor_chunks, const u64* params,
    const u64* grads, const u64* offsets, const float* wds, const int* adapt,
    const float* exp_avg, const float* exp_avg_sq, const double* scalars, const float* w_sumsq,
    const float* u_sumsq, float inv_bc1, float inv_bc2_sqrt, float eps, double lr,
    const double* lr_scales, int trust_clip) {
    __shared__ double sh[THREADS];
    if (scalars[3] != 0.0) return;
    unsigned int c = blockIdx.x;
    unsigned int t = chunks[3 * c], start = chunks[3 * c + 1], len = chunks[3 * c + 2];
    if (grads[t] == 0) return;
    float* w = (float*)params[t];
    const float* m = exp_avg + offsets[t];
    const float* v = exp_avg_sq + offsets[t];
    float wd = wds[t];
    int ad = adapt[t];
    // The group's rate, rounded to f32 as the CPU optimizer does: (float)(lr * lr_scale).
    float lr_t = (float)__dmul_rn(lr, lr_scales[t]);
    float trust = 1.0f;
    if (ad) {
        unsigned int first = tensor_chunks[2 * t], count = tensor_chunks[2 * t + 1];
        double wp = 0.0, up = 0.0;
        for (unsigned int k = threadIdx.x; k < count; k += blockDim.x) {
            wp = __dadd_rn(wp, (double)w_sumsq[first + k]);
            up = __dadd_rn(up, (double)u_sumsq[first + k]);
        }
        double ws = block_sum_f64(wp, sh);
        double us = block_sum_f64(up, sh);
        float w_norm = __fsqrt_rn((float)ws);
        float u_norm = __fsqrt_rn((float)us);
        float ratio = __fdiv_rn(w_norm, u_norm);
        float r = u_norm > 0.0f ? ratio : 1.0f;
        trust = w_norm > 0.0f ? r : 1.0f;
        if (trust_clip) trust = fminf(trust, 1.0f);
    }
    for (unsigned int i = start + threadIdx.x; i < start + len; i += blockDim.x) {
        float wi = w[i];
        float u = lamb_direction(m[i], v[i], wi, inv_bc1, inv_bc2_sqrt, eps, wd);
        if (ad) u = __fmul_rn(u, trust);
        w[i] = __fsub_rn(wi, __fmul_rn(u, lr_t));
    }
}
"#,
};

/// The kernels' entry points.
pub const KERNELS: [&str; 4] = [
    "lamb_grad_sumsq",
    "lamb_global_norm",
    "lamb_moments",
    "lamb_apply",
];

/// One parameter's place in the flat moment buffers.
#[derive(Clone, Debug)]
struct Slot {
    group: usize,
    index: usize,
    offset: usize,
    numel: usize,
}

/// The chunk list of tensors with `numels`: 3 u32 per chunk (tensor, start, len) and 2 u32 per
/// tensor (first chunk, number of chunks). Empty tensors get no chunk.
/// What the host knows of the optimizer's progress. An update's outcome (applied or skipped,
/// norm) is computed on the device; it is read when the next update is queued, or when a report,
/// the step count or the state is asked for ([`CudaLamb::settle`]), not right after queueing, so
/// the host never waits for the GPU to finish a step it has just queued.
struct HostState {
    /// Applied updates, up to and including the last settled one.
    step: u64,
    /// Whether parameter `i` has moments (has had a gradient in an applied step, or loaded).
    has_state: Vec<bool>,
    /// The queued update whose outcome has not been read yet.
    pending: Option<Pending>,
    /// The report of the last settled update.
    last: Option<StepReport>,
}

/// A queued update: the event after its report's copy to the host, and which parameters had a
/// gradient.
struct Pending {
    done: CudaEvent,
    had_grad: Vec<bool>,
}

/// The chunk list of tensors with `numels`: 3 u32 per chunk (tensor, start, len) and 2 u32 per
/// tensor (first chunk, number of chunks). Empty tensors get no chunk.
fn chunk_table(numels: &[usize], chunk: usize) -> (Vec<u32>, Vec<u32>) {
    let mut chunks = Vec::new();
    let mut per_tensor = Vec::with_capacity(2 * numels.len());
    for (t, &n) in numels.iter().enumerate() {
        let first = chunks.len() / 3;
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            chunks.extend([t as u32, start as u32, len as u32]);
            start += len;
        }
        per_tensor.extend([first as u32, (chunks.len() / 3 - first) as u32]);
    }
    (chunks, per_tensor)
}

fn msg(text: String) -> OptimError {
    OptimError::Candle(candle_core::Error::Msg(text))
}

fn drv<T>(
    r: Result<T, candle_core::cuda_backend::cudarc::driver::DriverError>,
) -> Result<T, OptimError> {
    r.map_err(|e| msg(format!("CudaLamb: CUDA driver: {e:?}")))
}

/// timm v0.5.4 LAMB over f32 master `Var`s on one CUDA device, with multi-tensor kernels (see
/// the [module docs](self)). Same constructor, maths, skipped steps and state keys as
/// [`crate::optim::Lamb`].
pub struct CudaLamb {
    groups: Vec<ParamGroup>,
    config: LambConfig,
    /// Step count, moment flags and the update in flight (see [`HostState`]).
    host: Mutex<HostState>,
    dev: CudaDevice,
    stream: Arc<CudaStream>,
    slots: Vec<Slot>,
    exp_avg: CudaSlice<f32>,
    exp_avg_sq: CudaSlice<f32>,
    num_chunks: usize,
    chunks: CudaSlice<u32>,
    tensor_chunks: CudaSlice<u32>,
    offsets: CudaSlice<u64>,
    wds: CudaSlice<f32>,
    lr_scales: CudaSlice<f64>,
    adapt: CudaSlice<i32>,
    /// Host side of the pointer table: `n` parameter addresses, then `n` gradient addresses.
    ptrs_host: PinnedHostSlice<u64>,
    ptrs: CudaSlice<u64>,
    grad_partial: CudaSlice<f32>,
    w_sumsq: CudaSlice<f32>,
    u_sumsq: CudaSlice<f32>,
    scalars: CudaSlice<f64>,
    report_host: PinnedHostSlice<f64>,
    funcs: [Kernel; 4],
}

impl std::fmt::Debug for CudaLamb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaLamb")
            .field("config", &self.config)
            .field("step", &self.host.lock().map(|h| h.step).unwrap_or(0))
            .field("num_tensors", &self.slots.len())
            .field("num_chunks", &self.num_chunks)
            .finish_non_exhaustive()
    }
}

impl CudaLamb {
    /// An optimizer over `groups` (see [`param_groups`](crate::optim::param_groups)): f32,
    /// contiguous `Var`s, all on the same CUDA device, with unique names; at least one.
    pub fn new(groups: Vec<ParamGroup>, config: LambConfig) -> Result<Self, OptimError> {
        check_groups(&groups)?;
        let mut slots = Vec::new();
        let mut dev: Option<CudaDevice> = None;
        let mut total = 0usize;
        for (gi, group) in groups.iter().enumerate() {
            for (pi, p) in group.params.iter().enumerate() {
                let t = p.var.as_tensor();
                let Device::Cuda(d) = t.device() else {
                    return Err(msg(format!(
                        "CudaLamb: parameter {:?} is on {:?}, not CUDA",
                        p.name,
                        t.device().location()
                    )));
                };
                match &dev {
                    None => dev = Some(d.clone()),
                    Some(first) if !t.device().same_device(&Device::Cuda(first.clone())) => {
                        return Err(msg(format!(
                            "CudaLamb: parameter {:?} is on another CUDA device",
                            p.name
                        )))
                    }
                    Some(_) => {}
                }
                // Checks contiguity; the address itself is taken again at every step.
                super::device_ptr(t)?;
                let numel = t.elem_count();
                if numel > u32::MAX as usize {
                    return Err(msg(format!(
                        "CudaLamb: parameter {:?} has {numel} elements; at most 2^32 - 1",
                        p.name
                    )));
                }
                slots.push(Slot {
                    group: gi,
                    index: pi,
                    offset: total,
                    numel,
                });
                total += numel;
            }
        }
        let Some(dev) = dev else {
            return Err(msg("CudaLamb: no parameters".to_string()));
        };
        let stream = dev.cuda_stream();
        let n = slots.len();
        let numels: Vec<usize> = slots.iter().map(|s| s.numel).collect();
        let (chunks, tensor_chunks) = chunk_table(&numels, CHUNK_ELEMS);
        let num_chunks = chunks.len() / 3;
        let offsets: Vec<u64> = slots.iter().map(|s| s.offset as u64).collect();
        let wds: Vec<f32> = slots
            .iter()
            .map(|s| groups[s.group].weight_decay as f32)
            .collect();
        let lr_scales: Vec<f64> = slots.iter().map(|s| groups[s.group].lr_scale).collect();
        let adapt: Vec<i32> = slots
            .iter()
            .map(|s| (groups[s.group].weight_decay != 0.0 || config.always_adapt) as i32)
            .collect();
        let f = |k: usize| kernels::func(&dev, MODULE, KERNELS[k]);
        let funcs = [f(0)?, f(1)?, f(2)?, f(3)?];
        let ctx = stream.context();
        Ok(Self {
            exp_avg: drv(stream.alloc_zeros::<f32>(total.max(1)))?,
            exp_avg_sq: drv(stream.alloc_zeros::<f32>(total.max(1)))?,
            chunks: drv(stream.clone_htod(&pad(chunks)))?,
            tensor_chunks: drv(stream.clone_htod(&tensor_chunks))?,
            offsets: drv(stream.clone_htod(&offsets))?,
            wds: drv(stream.clone_htod(&wds))?,
            lr_scales: drv(stream.clone_htod(&lr_scales))?,
            adapt: drv(stream.clone_htod(&adapt))?,
            // SAFETY: every element is written before each copy to the device.
            ptrs_host: drv(unsafe { ctx.alloc_pinned::<u64>(2 * n) })?,
            ptrs: drv(stream.alloc_zeros::<u64>(2 * n))?,
            grad_partial: drv(stream.alloc_zeros::<f32>(num_chunks.max(1)))?,
            w_sumsq: drv(stream.alloc_zeros::<f32>(num_chunks.max(1)))?,
            u_sumsq: drv(stream.alloc_zeros::<f32>(num_chunks.max(1)))?,
            scalars: drv(stream.alloc_zeros::<f64>(4))?,
            // Read by the host: not write-combined. SAFETY: written by the device before reads.
            report_host: drv(unsafe { ctx.alloc_pinned_with_flags::<f64>(4, 0) })?,
            host: Mutex::new(HostState {
                step: 0,
                has_state: vec![false; n],
                pending: None,
                last: None,
            }),
            num_chunks,
            slots,
            groups,
            config,
            dev,
            stream,
            funcs,
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &LambConfig {
        &self.config
    }

    /// The parameter groups.
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// Number of chunks the per-chunk kernels run over (one thread block each).
    pub fn num_chunks(&self) -> usize {
        self.num_chunks
    }

    fn param(&self, slot: &Slot) -> &crate::optim::NamedVar {
        &self.groups[slot.group].params[slot.index]
    }

    fn moment_keys(name: &str) -> (String, String) {
        (format!("exp_avg.{name}"), format!("exp_avg_sq.{name}"))
    }

    /// The gradient of each parameter as an f32 contiguous tensor on our device, if any.
    fn gather_grads(&self, grads: &GradStore) -> Result<Vec<Option<Tensor>>, OptimError> {
        let dev = Device::Cuda(self.dev.clone());
        let mut out = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            let p = self.param(slot);
            let Some(g) = grads.get(p.var.as_tensor()) else {
                out.push(None);
                continue;
            };
            if g.elem_count() != slot.numel {
                return Err(msg(format!(
                    "CudaLamb: gradient of {:?} has shape {:?}, parameter {:?}",
                    p.name,
                    g.dims(),
                    p.var.dims()
                )));
            }
            if !g.device().same_device(&dev) {
                return Err(msg(format!(
                    "CudaLamb: gradient of {:?} is on {:?}, not on the parameters' device",
                    p.name,
                    g.device().location()
                )));
            }
            let g = g.detach().to_dtype(DType::F32)?;
            let g = if g.is_contiguous() {
                g
            } else {
                g.contiguous()?
            };
            out.push(Some(g));
        }
        Ok(out)
    }

    /// [`settle`] of this optimizer.
    fn settle(&self) -> Result<MutexGuard<'_, HostState>, OptimError> {
        settle(&self.host, &self.report_host)
    }

    /// Copies of the moments of parameter `slot` as tensors of its shape.
    fn moment_tensors(&self, slot: &Slot) -> Result<(Tensor, Tensor), OptimError> {
        let shape = self.param(slot).var.shape().clone();
        let range = slot.offset..slot.offset + slot.numel;
        let copy = |src: &CudaSlice<f32>| -> Result<Tensor, OptimError> {
            // SAFETY: fully written by the copy below (an empty tensor has nothing to write).
            let mut dst = drv(unsafe { self.stream.alloc::<f32>(slot.numel.max(1)) })?;
            if slot.numel > 0 {
                drv(self.stream.memcpy_dtod(&src.slice(range.clone()), &mut dst))?;
            }
            let storage =
                candle_core::cuda_backend::CudaStorage::wrap_cuda_slice(dst, self.dev.clone());
            let t = super::tensor_from_storage(storage, slot.numel.max(1));
            Ok(t.narrow(0, 0, slot.numel)?.reshape(shape.clone())?)
        };
        Ok((copy(&self.exp_avg)?, copy(&self.exp_avg_sq)?))
    }
}

/// The host state with the queued update (if any) read: waits for its report (in `report`), then
/// counts it (step count, which parameters now have moments) when it was applied. A free
/// function over the two fields, so a caller may borrow the optimizer's other fields meanwhile.
fn settle<'a>(
    host: &'a Mutex<HostState>,
    report: &PinnedHostSlice<f64>,
) -> Result<MutexGuard<'a, HostState>, OptimError> {
    let mut host = host
        .lock()
        .map_err(|_| msg("CudaLamb: host state poisoned".into()))?;
    if let Some(p) = host.pending.take() {
        drv(p.done.synchronize())?;
        let r = drv(report.as_slice())?;
        let (grad_norm, clip_factor, skipped) = (r[0], r[1], r[3] != 0.0);
        let report = if skipped {
            StepReport {
                applied: false,
                grad_norm,
                clip_factor: 1.0,
                step: host.step,
            }
        } else {
            host.step += 1;
            for (has, had) in host.has_state.iter_mut().zip(p.had_grad) {
                *has |= had;
            }
            StepReport {
                applied: true,
                grad_norm,
                clip_factor,
                step: host.step,
            }
        };
        host.last = Some(report);
    }
    Ok(host)
}

/// A device buffer must not be empty: pads an empty table with one zero.
fn pad(mut v: Vec<u32>) -> Vec<u32> {
    if v.is_empty() {
        v.push(0);
    }
    v
}

fn blocks(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl TrainOptimizer for CudaLamb {
    fn queue_step(&mut self, grads: &GradStore, lr: f64) -> Result<(), OptimError> {
        // The previous update's outcome decides this one's step count (bias correction). By the
        // time the host queues this update the GPU has normally finished the previous one (it
        // ran before this step's forward pass), so this rarely waits; it also bounds the host to
        // one step ahead of the device.
        let mut host = settle(&self.host, &self.report_host)?;
        let gs = self.gather_grads(grads)?;
        if gs.iter().all(Option::is_none) {
            // As the CPU optimizer: a zero norm, an applied step that changes nothing.
            host.step += 1;
            host.last = Some(StepReport {
                applied: true,
                grad_norm: 0.0,
                clip_factor: 1.0,
                step: host.step,
            });
            return Ok(());
        }
        let n = self.slots.len();
        {
            // The previous copy of this buffer has run: `settle` waited for a later event.
            let table = drv(self.ptrs_host.as_mut_slice())?;
            for (i, (slot, g)) in self.slots.iter().zip(&gs).enumerate() {
                table[i] =
                    super::device_ptr(self.groups[slot.group].params[slot.index].var.as_tensor())?;
                table[n + i] = match g {
                    Some(g) => super::device_ptr(g)?,
                    None => 0,
                };
            }
        }
        drv(self.stream.memcpy_htod(&self.ptrs_host, &mut self.ptrs))?;

        // Scalars as the CPU optimizer computes them (f64, then cast to f32 as candle's affine).
        let c = self.config;
        let t = (host.step + 1) as f64;
        let (beta1, beta2) = c.betas;
        let beta3 = if c.grad_averaging { 1.0 - beta1 } else { 1.0 };
        let (bc1, bc2) = if c.bias_correction {
            (1.0 - beta1.powf(t), 1.0 - beta2.powf(t))
        } else {
            (1.0, 1.0)
        };
        let inv_bc1 = (1.0 / bc1) as f32;
        let inv_bc2_sqrt = (1.0 / bc2.sqrt()) as f32;
        let (beta1, beta2, beta3) = (beta1 as f32, beta2 as f32, beta3 as f32);
        let one_minus_beta2 = (1.0 - c.betas.1) as f32;
        let eps = c.eps as f32;
        let has_max = c.max_grad_norm.is_some() as i32;
        let max_norm = c.max_grad_norm.unwrap_or(0.0);
        let trust_clip = c.trust_clip as i32;
        let num_chunks = self.num_chunks as u32;
        let params = self.ptrs.slice(0..n);
        let grad_ptrs = self.ptrs.slice(n..2 * n);

        let per_chunk = blocks(self.num_chunks.max(1));
        if self.num_chunks > 0 {
            let mut b = self.funcs[0].builder();
            b.arg(&self.chunks)
                .arg(&grad_ptrs)
                .arg(&mut self.grad_partial);
            // SAFETY: argument types and counts match `lamb_grad_sumsq`; the gradient addresses
            // are those of `gs`, whose memory is freed in stream order after these kernels.
            unsafe { b.launch(per_chunk) }.map_err(|e| msg(format!("lamb_grad_sumsq: {e:?}")))?;
        }
        {
            let mut b = self.funcs[1].builder();
            b.arg(&self.grad_partial)
                .arg(&num_chunks)
                .arg(&has_max)
                .arg(&max_norm)
                .arg(&mut self.scalars);
            // SAFETY: matches `lamb_global_norm`; one block of THREADS threads.
            unsafe { b.launch(blocks(1)) }.map_err(|e| msg(format!("lamb_global_norm: {e:?}")))?;
        }
        if self.num_chunks > 0 {
            let mut b = self.funcs[2].builder();
            b.arg(&self.chunks)
                .arg(&params)
                .arg(&grad_ptrs)
                .arg(&self.offsets)
                .arg(&self.wds)
                .arg(&self.adapt)
                .arg(&mut self.exp_avg)
                .arg(&mut self.exp_avg_sq)
                .arg(&self.scalars)
                .arg(&beta1)
                .arg(&beta3)
                .arg(&beta2)
                .arg(&one_minus_beta2)
                .arg(&inv_bc1)
                .arg(&inv_bc2_sqrt)
                .arg(&eps)
                .arg(&mut self.w_sumsq)
                .arg(&mut self.u_sumsq);
            // SAFETY: matches `lamb_moments`; moments sized by the slots' offsets and numels.
            unsafe { b.launch(per_chunk) }.map_err(|e| msg(format!("lamb_moments: {e:?}")))?;

            let mut b = self.funcs[3].builder();
            b.arg(&self.chunks)
                .arg(&self.tensor_chunks)
                .arg(&params)
                .arg(&grad_ptrs)
                .arg(&self.offsets)
                .arg(&self.wds)
                .arg(&self.adapt)
                .arg(&self.exp_avg)
                .arg(&self.exp_avg_sq)
                .arg(&self.scalars)
                .arg(&self.w_sumsq)
                .arg(&self.u_sumsq)
                .arg(&inv_bc1)
                .arg(&inv_bc2_sqrt)
                .arg(&eps)
                .arg(&lr)
                .arg(&self.lr_scales)
                .arg(&trust_clip);
            // SAFETY: matches `lamb_apply`; the parameter addresses are those of our Vars.
            unsafe { b.launch(per_chunk) }.map_err(|e| msg(format!("lamb_apply: {e:?}")))?;
        }
        drv(self
            .stream
            .memcpy_dtoh(&self.scalars, &mut self.report_host))?;
        let done = drv(self.stream.record_event(None))?;
        host.pending = Some(Pending {
            done,
            had_grad: gs.iter().map(Option::is_some).collect(),
        });
        // The gradient copies in `gs` are freed in stream order, after the kernels that read
        // them: their memory is reused only by work queued later on the same stream.
        drop(gs);
        Ok(())
    }

    fn last_report(&mut self) -> Result<Option<StepReport>, OptimError> {
        Ok(self.settle()?.last)
    }

    /// # Panics
    /// On a CUDA error while reading a queued update's outcome (the trait method returns no
    /// `Result`).
    fn num_steps(&self) -> u64 {
        self.settle()
            .unwrap_or_else(|e| panic!("CudaLamb::num_steps: {e}"))
            .step
    }

    /// Keys: `"step"`, then `"exp_avg.<param>"` and `"exp_avg_sq.<param>"` for every parameter
    /// that has received a gradient: the same keys, order and shapes as [`crate::optim::Lamb`].
    ///
    /// # Panics
    /// On a CUDA error while copying the moments out (the trait method returns no `Result`).
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let host = self
            .settle()
            .unwrap_or_else(|e| panic!("CudaLamb::state_tensors: {e}"));
        let mut out = vec![(STEP_KEY.to_string(), step_tensor(host.step))];
        for (slot, &has) in self.slots.iter().zip(&host.has_state) {
            if has {
                let (k1, k2) = Self::moment_keys(&self.param(slot).name);
                let (m, v) = self
                    .moment_tensors(slot)
                    .unwrap_or_else(|e| panic!("CudaLamb::state_tensors: {e}"));
                out.push((k1, m));
                out.push((k2, v));
            }
        }
        out
    }

    fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<(), OptimError> {
        let mut host = settle(&self.host, &self.report_host)?;
        let step = read_step(tensors)?;
        let mut known = HashSet::new();
        let mut loaded = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            let p = self.param(slot);
            let (k1, k2) = Self::moment_keys(&p.name);
            let m = read_moment(tensors, &k1, p.var.as_tensor())?;
            let v = read_moment(tensors, &k2, p.var.as_tensor())?;
            loaded.push(match (m, v) {
                (Some(m), Some(v)) => Some((m, v)),
                (None, None) => None,
                (Some(_), None) => return Err(OptimError::MissingState { key: k2 }),
                (None, Some(_)) => return Err(OptimError::MissingState { key: k1 }),
            });
            known.insert(k1);
            known.insert(k2);
        }
        check_keys(tensors, &known)?;
        for (i, slot) in self.slots.iter().enumerate() {
            let range = slot.offset..slot.offset + slot.numel;
            if slot.numel == 0 {
                host.has_state[i] = loaded[i].is_some();
                continue;
            }
            match &loaded[i] {
                Some((m, v)) => {
                    for (src, dst) in [(m, &mut self.exp_avg), (v, &mut self.exp_avg_sq)] {
                        let (storage, layout) = src.storage_and_layout();
                        let Storage::Cuda(cs) = &*storage else {
                            return Err(msg("CudaLamb: loaded moment not on CUDA".into()));
                        };
                        let start = layout.start_offset();
                        let s = cs.as_cuda_slice::<f32>()?;
                        drv(self.stream.memcpy_dtod(
                            &s.slice(start..start + slot.numel),
                            &mut dst.slice_mut(range.clone()),
                        ))?;
                    }
                }
                None => {
                    drv(self
                        .stream
                        .memset_zeros(&mut self.exp_avg.slice_mut(range.clone())))?;
                    drv(self
                        .stream
                        .memset_zeros(&mut self.exp_avg_sq.slice_mut(range)))?;
                }
            }
            host.has_state[i] = loaded[i].is_some();
        }
        // The loaded tensors may be freed once the copies have run.
        drv(self.stream.synchronize())?;
        host.step = step;
        host.last = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_table_covers_every_element_once() {
        let numels = [5, 0, 16, 17, 1];
        let (chunks, per_tensor) = chunk_table(&numels, 8);
        let c: Vec<[u32; 3]> = chunks.chunks(3).map(|x| [x[0], x[1], x[2]]).collect();
        assert_eq!(
            c,
            vec![
                [0, 0, 5],
                [2, 0, 8],
                [2, 8, 8],
                [3, 0, 8],
                [3, 8, 8],
                [3, 16, 1],
                [4, 0, 1]
            ]
        );
        assert_eq!(per_tensor, vec![0, 1, 1, 0, 1, 2, 3, 3, 6, 1]);
    }

    /// Needs libnvrtc (`LD_LIBRARY_PATH` from `scripts/setup-cuda.sh --env`), not a GPU.
    #[test]
    fn nvrtc_compiles_the_lamb_kernels() {
        let ptx = kernels::ptx(MODULE).expect("NVRTC compiles the LAMB kernels");
        for name in KERNELS {
            assert!(
                ptx.contains(&format!(".entry {name}")),
                "{name} missing from the PTX"
            );
        }
        // No contracted multiply-add in the element-wise maths: every f32 product is rounded.
        assert!(!ptx.contains("fma.rn.f32"), "an f32 fma slipped in");
    }
}
