//! The CUDA feed: page-locked loader buffers, host-to-device copies on a stream of their own,
//! and one kernel from the u8 NHWC batch to the model's input (Mixup/CutMix, normalisation,
//! layout and dtype).
//!
//! Per batch ([`CudaUpload`], the CUDA [`Upload`]):
//!
//! 1. `start`: the copy stream waits until the device slot's previous reader (a kernel on
//!    candle's stream) is done, copies the batch's bytes from its page-locked loader buffer
//!    into the slot, and records an event. The host does not wait; the batch (its buffer) is
//!    held in an [`InFlight`] queue until that event has completed, then goes back to the
//!    loader.
//! 2. `next_images`, a step later: candle's stream waits on the event (a device-side wait, no
//!    host synchronisation), one kernel writes the mixed, normalised input into a new tensor,
//!    and the slot's "consumed" event is recorded for the next copy into it.
//!
//! The copy stream is created with the driver API and wrapped as a borrowed stream, so candle's
//! context stays in single-stream mode: `CudaContext::new_stream` would switch cudarc to
//! multi-stream event tracking, which records and waits on events around every kernel argument
//! of every candle op in the model. Ordering between the two streams is therefore explicit, and
//! all of it is in this file: the copy waits on the slot's `consumed` event, the kernel waits on
//! the copy's event, and the host buffer is released only after the copy's event completes.

use std::collections::VecDeque;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    result, CudaEvent, CudaSlice, CudaStream, LaunchArgs, PinnedHostSlice, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{bail, DType, Result, Tensor};
use loader::mix::{MixDraw, MixKind};
use loader::{Batch, HostStorage};

use super::kernels::{self, Module};
use crate::feed::Normalization;
use crate::model::ActivationLayout;
use crate::transfer::{CopyFence, DynStorage, InFlight, Upload};

/// The feed kernels: Mixup/CutMix of a u8 NHWC batch (`mix_u8`, for tests and tools), and the
/// fused mix + normalise into bf16 NHWC (`feed_nhwc_bf16`) or f32 NCHW (`feed_nchw_f32`).
///
/// Mixing follows `loader::mix::mix_u8_batch`: image k is mixed with image `n - 1 - k`; Mixup
/// is `rint(x * l + y * r)` in single precision with the products and the sum rounded
/// separately (no fused multiply-add, as on the host), rounded half to even; CutMix takes the
/// box from the partner. Normalisation is `(x - 255 mean) / (255 std)` in f32 (IEEE division),
/// as `Feed::images`; bf16 output rounds to nearest even.
pub const MODULE: Module = Module {
    name: "trainer_feed",
    source: r#"
__device__ __forceinline__ u8 mixed_byte(const u8* src, long long i, long long len, int n, int w,
                                         int mode, float l, float r,
                                         int y0, int y1, int x0, int x1) {
    u8 v = src[i];
    if (mode == 0) return v;
    long long k = i / len;
    long long off = i - k * len;
    u8 p = src[(long long)(n - 1 - k) * len + off];
    if (mode == 1) {
        float m = __fadd_rn(__fmul_rn((float)v, l), __fmul_rn((float)p, r));
        return (u8)fminf(fmaxf(rintf(m), 0.0f), 255.0f);
    }
    int x = (int)((off / 3) % w);
    int y = (int)(off / (3LL * w));
    return (y >= y0 && y < y1 && x >= x0 && x < x1) ? p : v;
}

__device__ __forceinline__ float normalised(u8 v, int c, float m0, float m1, float m2,
                                            float s0, float s1, float s2) {
    float m = c == 0 ? m0 : (c == 1 ? m1 : m2);
    float s = c == 0 ? s0 : (c == 1 ? s1 : s2);
    return __fdiv_rn(__fsub_rn((float)v, m), s);
}

extern "C" __global__ void mix_u8(const u8* src, u8* dst, int n, int h, int w,
                                  int mode, float l, float r, int y0, int y1, int x0, int x1) {
    long long len = 3LL * h * w;
    long long total = len * n;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        dst[i] = mixed_byte(src, i, len, n, w, mode, l, r, y0, y1, x0, x1);
    }
}

extern "C" __global__ void feed_nhwc_bf16(const u8* src, bf16* dst, int n, int h, int w,
                                          int mode, float l, float r,
                                          int y0, int y1, int x0, int x1,
                                          float m0, float m1, float m2,
                                          float s0, float s1, float s2) {
    long long len = 3LL * h * w;
    long long total = len * n;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        u8 v = mixed_byte(src, i, len, n, w, mode, l, r, y0, y1, x0, x1);
        dst[i] = f2bf(normalised(v, (int)(i % 3), m0, m1, m2, s0, s1, s2));
    }
}

extern "C" __global__ void feed_nchw_f32(const u8* src, float* dst, int n, int h, int w,
                                         int mode, float l, float r,
                                         int y0, int y1, int x0, int x1,
                                         float m0, float m1, float m2,
                                         float s0, float s1, float s2) {
    long long len = 3LL * h * w;
    long long total = len * n;
    long long plane = (long long)h * w;
    for (long long o = blockIdx.x * (long long)blockDim.x + threadIdx.x; o < total;
         o += (long long)gridDim.x * blockDim.x) {
        long long k = o / len;
        int c = (int)((o / plane) % 3);
        long long yx = o % plane;
        long long i = k * len + yx * 3 + c;
        u8 v = mixed_byte(src, i, len, n, w, mode, l, r, y0, y1, x0, x1);
        dst[o] = normalised(v, c, m0, m1, m2, s0, s1, s2);
    }
}
"#,
};

/// Threads per block of the feed kernels.
const THREADS: u32 = 256;
/// Blocks at most (the kernels loop over the rest).
const MAX_BLOCKS: usize = 8192;

fn grid(total: usize) -> candle_core::cuda_backend::cudarc::driver::LaunchConfig {
    let mut cfg = kernels::grid_1d(total, THREADS);
    cfg.grid_dim.0 = cfg.grid_dim.0.min(MAX_BLOCKS as u32);
    cfg
}

/// A draw as kernel arguments: mode (0 none, 1 Mixup, 2 CutMix), the two weights in f32 as the
/// host computes them, and the box rows/columns.
struct MixArgs {
    mode: i32,
    l: f32,
    r: f32,
    b: [i32; 4],
}

fn mix_args(draw: &MixDraw, n: usize) -> Result<MixArgs> {
    if draw.kind != MixKind::None && !n.is_multiple_of(2) {
        bail!("Mixup/CutMix needs an even batch size, got {n}");
    }
    let (l, r) = (draw.lam as f32, (1.0 - draw.lam) as f32);
    Ok(match draw.kind {
        MixKind::None => MixArgs {
            mode: 0,
            l: 1.0,
            r: 0.0,
            b: [0; 4],
        },
        MixKind::Mixup => MixArgs {
            mode: 1,
            l,
            r,
            b: [0; 4],
        },
        MixKind::CutMix(bx) => MixArgs {
            mode: 2,
            l,
            r,
            b: [bx.y0 as i32, bx.y1 as i32, bx.x0 as i32, bx.x1 as i32],
        },
    })
}

fn check_batch(src: &CudaSlice<u8>, n: usize, size: usize) -> Result<usize> {
    let total = n * size * size * 3;
    if src.len() < total {
        bail!(
            "cuda feed: {} bytes on the device, a batch of {n} at {size}px needs {total}",
            src.len()
        );
    }
    if total > i32::MAX as usize * 3 || size > i32::MAX as usize {
        bail!("cuda feed: batch of {n} at {size}px is too large");
    }
    Ok(total)
}

/// The scalar arguments of the `feed_*` kernels, after the source and output pointers.
struct FeedArgs {
    n: i32,
    size: i32,
    mix: MixArgs,
    mean: [f32; 3],
    std: [f32; 3],
}

impl FeedArgs {
    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        b.arg(&self.n).arg(&self.size).arg(&self.size);
        b.arg(&self.mix.mode).arg(&self.mix.l).arg(&self.mix.r);
        for v in &self.mix.b {
            b.arg(v);
        }
        for v in self.mean.iter().chain(&self.std) {
            b.arg(v);
        }
    }
}

/// Mixes `n` u8 NHWC images of `size` x `size` in `src` by `draw` into a new device buffer
/// (the device version of `loader::mix::mix_u8_batch`, same bytes). Runs on `dev`'s stream.
pub fn mix_u8(
    dev: &CudaDevice,
    src: &CudaSlice<u8>,
    n: usize,
    size: usize,
    draw: &MixDraw,
) -> Result<CudaSlice<u8>> {
    let total = check_batch(src, n, size)?;
    let m = mix_args(draw, n)?;
    // SAFETY: the kernel writes every one of the `total` bytes (and the allocation is at least 1).
    let mut dst = unsafe { dev.alloc::<u8>(total.max(1))? };
    let func = kernels::func(dev, MODULE, "mix_u8")?;
    let (n_i, s_i) = (n as i32, size as i32);
    let mut b = func.builder();
    b.arg(src).arg(&mut dst).arg(&n_i).arg(&s_i).arg(&s_i);
    b.arg(&m.mode).arg(&m.l).arg(&m.r);
    b.arg(&m.b[0]).arg(&m.b[1]).arg(&m.b[2]).arg(&m.b[3]);
    // SAFETY: the argument list matches `mix_u8` in MODULE; `src` holds at least `total` bytes
    // (checked) and `dst` exactly `total`.
    unsafe { b.launch(grid(total)) }.w()?;
    Ok(dst)
}

/// Mixes (by `draw`) and normalises `n` u8 NHWC images of `size` x `size` in `src` into a new
/// tensor in `layout`, in one kernel on `dev`'s stream (the dtype rule of
/// [`crate::feed::Feed::images_for`] on CUDA), with the statistics `norm` (the model's). Bytes
/// beyond the batch are ignored.
///
/// # Shapes
/// `[n, size, size, 3]` bf16 for [`ActivationLayout::Nhwc`], `[n, 3, size, size]` f32 for
/// [`ActivationLayout::Nchw`].
pub fn normalise_u8(
    dev: &CudaDevice,
    src: &CudaSlice<u8>,
    n: usize,
    size: usize,
    draw: &MixDraw,
    layout: ActivationLayout,
    norm: Normalization,
) -> Result<Tensor> {
    let total = check_batch(src, n, size)?;
    let m = mix_args(draw, n)?;
    let (mean, std) = norm.scaled();
    let (dtype, name) = match layout {
        ActivationLayout::Nhwc => (DType::BF16, "feed_nhwc_bf16"),
        ActivationLayout::Nchw => (DType::F32, "feed_nchw_f32"),
    };
    let func = kernels::func(dev, MODULE, name)?;
    // SAFETY: the kernel writes every one of the `total` elements.
    let mut storage = unsafe { super::alloc_storage(dev, dtype, total)? };
    let args = FeedArgs {
        n: n as i32,
        size: size as i32,
        mix: m,
        mean,
        std,
    };
    match layout {
        ActivationLayout::Nhwc => {
            let out = storage.as_cuda_slice_mut::<half::bf16>()?;
            let mut b = func.builder();
            b.arg(src).arg(out);
            args.push(&mut b);
            // SAFETY: the argument list matches the kernel in MODULE; `src` holds at least
            // `total` bytes (checked) and the output `total` elements of the kernel's type.
            unsafe { b.launch(grid(total)) }.w()?;
        }
        ActivationLayout::Nchw => {
            let out = storage.as_cuda_slice_mut::<f32>()?;
            let mut b = func.builder();
            b.arg(src).arg(out);
            args.push(&mut b);
            // SAFETY: the argument list matches the kernel in MODULE; `src` holds at least
            // `total` bytes (checked) and the output `total` elements of the kernel's type.
            unsafe { b.launch(grid(total)) }.w()?;
        }
    }
    Ok(match layout {
        ActivationLayout::Nhwc => super::tensor_from_storage(storage, (n, size, size, 3)),
        ActivationLayout::Nchw => super::tensor_from_storage(storage, (n, 3, size, size)),
    })
}

/// A loader batch buffer in page-locked host memory, so the copy to the device is a real
/// asynchronous DMA (about 9x the bandwidth of pageable memory on the H100 machine).
///
/// Allocated without `CU_MEMHOSTALLOC_WRITECOMBINED` (cudarc's `alloc_pinned` default): the
/// loader's workers read their slot back (RandAugment works in place), and write-combined
/// memory is uncached for reads.
pub struct PinnedBuffer {
    mem: PinnedHostSlice<u8>,
}

impl HostStorage for PinnedBuffer {
    fn bytes(&self) -> &[u8] {
        // `as_slice` waits on the buffer's own event, which nothing records (copies are gated
        // by `InFlight` instead), so it returns at once; it fails only on a lost device.
        self.mem
            .as_slice()
            .expect("page-locked buffer: the CUDA device failed")
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.mem
            .as_mut_slice()
            .expect("page-locked buffer: the CUDA device failed")
    }
}

/// `count` zeroed page-locked buffers of `bytes` each, in `dev`'s context.
pub fn pinned_buffers(dev: &CudaDevice, count: usize, bytes: usize) -> Result<Vec<PinnedBuffer>> {
    let ctx = dev.cuda_stream().context().clone();
    (0..count)
        .map(|_| {
            // SAFETY: the memory is uninitialised; it is zeroed below before anything reads it.
            let mut mem = unsafe { ctx.alloc_pinned_with_flags::<u8>(bytes.max(1), 0) }.w()?;
            mem.as_mut_slice().w()?.fill(0);
            Ok(PinnedBuffer { mem })
        })
        .collect()
}

/// The completion of one copy: an event recorded on the copy stream after it.
pub struct EventFence(Arc<CudaEvent>);

impl CopyFence for EventFence {
    fn is_complete(&self) -> Result<bool> {
        self.0.try_is_complete().w()
    }
    fn wait(&self) -> Result<()> {
        self.0.synchronize().w()
    }
}

/// A device buffer for one batch and the event after its last reader.
struct Slot {
    buf: CudaSlice<u8>,
    consumed: CudaEvent,
}

struct Pending {
    slot: usize,
    n: usize,
    size: usize,
    draw: MixDraw,
    copied: Arc<CudaEvent>,
}

/// Device slots: one batch being read by the step, one being copied, one spare.
const NUM_SLOTS: usize = 3;
/// Host batches held until their copies complete.
const HOST_IN_FLIGHT: usize = 2;

/// The CUDA [`Upload`]: asynchronous copies from page-locked loader buffers on a copy stream,
/// then one kernel into the model input on candle's stream (see the module notes).
pub struct CudaUpload {
    dev: CudaDevice,
    compute: Arc<CudaStream>,
    slots: Vec<Slot>,
    next_slot: usize,
    pending: VecDeque<Pending>,
    in_flight: InFlight<Batch<DynStorage>, EventFence>,
    copy: super::SideStream,
    norm: Normalization,
}

impl CudaUpload {
    /// An upload to `dev` for batches of at most `max_batch_bytes`.
    pub fn new(dev: &CudaDevice, max_batch_bytes: usize) -> Result<Self> {
        let compute = dev.cuda_stream();
        let ctx = compute.context().clone();
        let copy = super::SideStream::new(&ctx)?;
        let mut slots = Vec::with_capacity(NUM_SLOTS);
        for _ in 0..NUM_SLOTS {
            // SAFETY: a slot is read only after a copy into it has completed (`next_images`
            // waits on the copy's event), and only the copied bytes are read.
            let buf = unsafe { dev.alloc::<u8>(max_batch_bytes.max(1))? };
            // Recorded after the (stream-ordered) allocation: the first copy waits for it.
            let consumed = compute.record_event(None).w()?;
            slots.push(Slot { buf, consumed });
        }
        // Compile and load the kernels now rather than in the first step.
        kernels::func(dev, MODULE, "feed_nhwc_bf16")?;
        Ok(CudaUpload {
            dev: dev.clone(),
            compute,
            slots,
            next_slot: 0,
            pending: VecDeque::new(),
            in_flight: InFlight::new(HOST_IN_FLIGHT),
            copy,
            norm: Normalization::IMAGENET,
        })
    }

    /// The same upload normalising with `norm` (a model's statistics) instead of ImageNet's.
    pub fn with_normalization(mut self, norm: Normalization) -> Self {
        self.norm = norm;
        self
    }
}

impl Upload for CudaUpload {
    fn start(&mut self, batch: Batch<DynStorage>, draw: &MixDraw) -> Result<()> {
        self.in_flight.release_completed()?;
        if self.pending.len() >= self.slots.len() {
            bail!(
                "cuda upload: {} batches started and not taken (at most {})",
                self.pending.len(),
                self.slots.len()
            );
        }
        let (n, size) = (batch.len, batch.size as usize);
        mix_args(draw, n)?;
        let k = self.next_slot;
        let slot = &mut self.slots[k];
        let bytes = batch.images();
        if bytes.len() > slot.buf.len() {
            bail!(
                "cuda upload: a batch of {} bytes, the device slots hold {}",
                bytes.len(),
                slot.buf.len()
            );
        }
        let stream = &self.copy.stream;
        // The slot's last reader, a kernel on candle's stream, finishes before the overwrite.
        stream.wait(&slot.consumed).w()?;
        if !bytes.is_empty() {
            // Asynchronous: `bytes` is page-locked memory of `batch`, which stays in `in_flight`
            // (out of the loader's hands) until the event recorded below has completed.
            stream.memcpy_htod(bytes, &mut slot.buf).w()?;
        }
        let copied = Arc::new(stream.record_event(None).w()?);
        self.next_slot = (k + 1) % self.slots.len();
        self.pending.push_back(Pending {
            slot: k,
            n,
            size,
            draw: *draw,
            copied: copied.clone(),
        });
        self.in_flight.push(batch, EventFence(copied))
    }

    fn next_images(&mut self, layout: ActivationLayout) -> Result<Tensor> {
        let Some(p) = self.pending.pop_front() else {
            bail!("upload: next_images without a started batch")
        };
        // A device-side wait: candle's stream runs the kernel once the copy is done.
        self.compute.wait(&p.copied).w()?;
        let slot = &self.slots[p.slot];
        let xs = normalise_u8(
            &self.dev, &slot.buf, p.n, p.size, &p.draw, layout, self.norm,
        )?;
        slot.consumed.record(&self.compute).w()?;
        self.in_flight.release_completed()?;
        Ok(xs)
    }

    fn take_wait_s(&mut self) -> f64 {
        self.in_flight.take_wait_s()
    }

    fn pending(&self) -> usize {
        self.pending.len()
    }
}

impl Drop for CudaUpload {
    fn drop(&mut self) {
        // Copies may still write into the slots: finish them before the slots are freed (fields
        // drop in declaration order, the slots before the copy stream).
        let cu = self.copy.stream.cu_stream();
        self.copy.ctx.record_err(self.copy.ctx.bind_to_thread());
        // SAFETY: the copy stream is alive (owned by `self.copy`).
        self.copy
            .ctx
            .record_err(unsafe { result::stream::synchronize(cu) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_become_kernel_arguments() -> Result<()> {
        let cut = MixDraw {
            lam: 0.75,
            kind: MixKind::CutMix(loader::mix::CutBox {
                y0: 1,
                y1: 3,
                x0: 2,
                x1: 4,
            }),
        };
        let m = mix_args(&cut, 4)?;
        assert_eq!((m.mode, m.b), (2, [1, 3, 2, 4]));
        let mixup = MixDraw {
            lam: 0.3,
            kind: MixKind::Mixup,
        };
        let m = mix_args(&mixup, 2)?;
        assert_eq!(
            (m.mode, m.l, m.r),
            (1, 0.3f64 as f32, (1.0 - 0.3f64) as f32)
        );
        assert!(mix_args(&mixup, 3).is_err());
        let none = MixDraw {
            lam: 1.0,
            kind: MixKind::None,
        };
        assert_eq!(mix_args(&none, 3)?.mode, 0);
        Ok(())
    }
}
