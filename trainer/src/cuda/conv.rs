//! cuDNN convolutions on channels-last bf16 tensors: forward, backward data and backward filter
//! as candle custom ops.
//!
//! Layouts: input `[N, H, W, C]`, filter `[K, R, S, C / groups]` (cuDNN's NHWC filter format,
//! "KRSC"), output `[N, OH, OW, K]`, all contiguous bf16; accumulation and `alpha`/`beta` in f32
//! (`CUDNN_DATA_FLOAT` compute type).
//!
//! # Algorithms
//!
//! Per shape, the algorithm of each direction is chosen once with `cudnnFind*Algorithm` (cuDNN
//! runs the candidates and times them, as PyTorch's `cudnn.benchmark = True`). The search runs
//! with tensor-op maths allowed, so cuDNN reports every algorithm under both math types; the
//! winner's math type is then set on that direction's own convolution descriptor (as PyTorch
//! does: the algorithm and the math type together select the kernel). The policy
//! ([`set_deterministic`]):
//! * fastest (the default, as PyTorch's anchor): the fastest algorithm whose workspace fits
//!   [`MAX_WORKSPACE`], deterministic or not. Some of cuDNN's fastest backward algorithms sum
//!   with atomics, so two runs from one seed may then differ in the last bits;
//! * deterministic (`train --deterministic`): the fastest algorithm cuDNN reports as
//!   deterministic; a shape without one is an error naming it.
//!
//! The choices are kept on disk ([`crate::disk_cache`], one table per GPU, driver and cuDNN
//! version, keyed by shape and policy), so the next process skips the search (about 70
//! shape-directions for ResNet-50, each timing several algorithms). A cached choice is checked
//! against cuDNN (its workspace size queried again) before use, and searched again if refused.
//!
//! # State
//!
//! One cuDNN state per device ordinal (not per candle `CudaDevice`: every `Device::new_cuda(0)`
//! is a new candle device over the same GPU, and a program or test may open it twice): the
//! handle, the plans, and one workspace buffer grown to the largest size seen. candle runs a
//! device's work on the calling thread's default stream (`CU_STREAM_PER_THREAD`), which the
//! handle is bound to. When another thread than the last one uses the state, the context is
//! synchronised first, so the shared workspace is never in use by two streams at once.
//!
//! The calls go through cudarc's raw cuDNN bindings because its safe wrappers only expose the
//! heuristic algorithm choice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::ThreadId;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::sys;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtrMut};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{bail, CpuStorage, CustomOp2, DType, Error, Layout, Result, Shape, Tensor};

use super::{alloc_storage, storage_ptr};
use crate::disk_cache::{DiskCache, JsonTable};

fn check(status: sys::cudnnStatus_t, what: &str) -> Result<()> {
    if status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        return Ok(());
    }
    let msg = unsafe {
        let p = sys::cudnnGetErrorString(status);
        if p.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    Err(Error::Msg(format!("cuDNN {what}: {status:?} {msg}")))
}

/// Convolution geometry: everything that selects descriptors and algorithms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvShape {
    /// Batch.
    pub n: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Input channels.
    pub c: usize,
    /// Output channels.
    pub k: usize,
    /// Kernel height (= width).
    pub r: usize,
    /// Stride (both axes).
    pub stride: usize,
    /// Zero padding (both axes).
    pub pad: usize,
    /// Groups.
    pub groups: usize,
}

impl ConvShape {
    /// Output height and width.
    pub fn out_hw(&self) -> (usize, usize) {
        let o = |x: usize| (x + 2 * self.pad - self.r) / self.stride + 1;
        (o(self.h), o(self.w))
    }

    fn x_len(&self) -> usize {
        self.n * self.h * self.w * self.c
    }

    fn y_len(&self) -> usize {
        let (oh, ow) = self.out_hw();
        self.n * oh * ow * self.k
    }

    fn w_len(&self) -> usize {
        self.k * self.r * self.r * (self.c / self.groups)
    }

    /// The key of this shape (and policy) in the algorithm cache.
    fn cache_key(&self, deterministic: bool) -> String {
        format!(
            "n{}-h{}-w{}-c{}-k{}-r{}-s{}-p{}-g{}-{}",
            self.n,
            self.h,
            self.w,
            self.c,
            self.k,
            self.r,
            self.stride,
            self.pad,
            self.groups,
            if deterministic {
                "deterministic"
            } else {
                "fastest"
            }
        )
    }
}

static DETERMINISTIC: AtomicBool = AtomicBool::new(false);

/// Chooses the algorithm policy for convolution shapes planned from now on: `true` takes the
/// fastest deterministic algorithm of each direction (bit-identical reruns), `false` (the
/// default) the fastest one. Shapes already planned keep their algorithms under the policy
/// they were planned with; both policies' plans coexist.
pub fn set_deterministic(on: bool) {
    DETERMINISTIC.store(on, Ordering::SeqCst);
}

/// The current policy (see [`set_deterministic`]).
pub fn deterministic() -> bool {
    DETERMINISTIC.load(Ordering::SeqCst)
}

/// One direction of a plan: its convolution descriptor (carrying the winner's math type), the
/// algorithm and its workspace size.
struct Direction<A> {
    conv: sys::cudnnConvolutionDescriptor_t,
    algo: A,
    math: sys::cudnnMathType_t,
    workspace: usize,
}

/// The descriptors and chosen algorithms of one shape.
struct Plan {
    x: sys::cudnnTensorDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    fwd: Direction<sys::cudnnConvolutionFwdAlgo_t>,
    bwd_data: Direction<sys::cudnnConvolutionBwdDataAlgo_t>,
    bwd_filter: Direction<sys::cudnnConvolutionBwdFilterAlgo_t>,
    /// Read from the disk cache rather than searched.
    cached: bool,
}

impl Drop for Plan {
    fn drop(&mut self) {
        unsafe {
            for t in [self.x, self.y] {
                if !t.is_null() {
                    sys::cudnnDestroyTensorDescriptor(t);
                }
            }
            if !self.w.is_null() {
                sys::cudnnDestroyFilterDescriptor(self.w);
            }
            for c in [self.fwd.conv, self.bwd_data.conv, self.bwd_filter.conv] {
                if !c.is_null() {
                    sys::cudnnDestroyConvolutionDescriptor(c);
                }
            }
        }
    }
}

/// A choice as stored on disk: `[algorithm, math type]` per direction (cuDNN's enum values).
type StoredChoice = [[u32; 2]; 3];

const FWD_ALGOS: [sys::cudnnConvolutionFwdAlgo_t; 8] = {
    use sys::cudnnConvolutionFwdAlgo_t::*;
    [
        CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
        CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
        CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
        CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
        CUDNN_CONVOLUTION_FWD_ALGO_FFT,
        CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
        CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
        CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
    ]
};
const BWD_DATA_ALGOS: [sys::cudnnConvolutionBwdDataAlgo_t; 6] = {
    use sys::cudnnConvolutionBwdDataAlgo_t::*;
    [
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED,
    ]
};
const BWD_FILTER_ALGOS: [sys::cudnnConvolutionBwdFilterAlgo_t; 7] = {
    use sys::cudnnConvolutionBwdFilterAlgo_t::*;
    [
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING,
    ]
};
const MATH_TYPES: [sys::cudnnMathType_t; 4] = {
    use sys::cudnnMathType_t::*;
    [
        CUDNN_DEFAULT_MATH,
        CUDNN_TENSOR_OP_MATH,
        CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION,
        CUDNN_FMA_MATH,
    ]
};

/// The enum value stored as `v`, if it is one.
fn from_stored<T: Copy>(table: &[T], v: u32) -> Option<T> {
    table.get(v as usize).copied()
}

/// The per-device cuDNN state: handle (bound to the per-thread stream), plans, workspace.
struct State {
    handle: sys::cudnnHandle_t,
    plans: HashMap<(ConvShape, bool), Arc<Plan>>,
    workspace: Option<CudaSlice<u8>>,
    /// The thread whose stream last queued work with this state.
    last_thread: ThreadId,
    /// The algorithm cache of this GPU and library versions (`None`: not opened yet).
    table: Option<JsonTable<StoredChoice>>,
    /// Shapes searched and shapes read from the disk cache, for logs.
    searched: usize,
    from_disk: usize,
}

// The raw handles are only used under the state's mutex.
unsafe impl Send for State {}
unsafe impl Send for Plan {}
unsafe impl Sync for Plan {}

/// The states by device ordinal.
fn states() -> &'static Mutex<HashMap<usize, State>> {
    static STATES: OnceLock<Mutex<HashMap<usize, State>>> = OnceLock::new();
    STATES.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Cap on the workspace of one algorithm (larger ones are not considered).
pub const MAX_WORKSPACE: usize = 2 << 30;

/// One measured candidate: algorithm, time (ms), workspace bytes, deterministic, math type.
type Candidate<A> = (A, f32, usize, bool, sys::cudnnMathType_t);

/// The candidate the policy takes: the fastest whose workspace fits (and, when `deterministic`,
/// that cuDNN reports as deterministic). `what` names the shape and direction for the error.
fn pick<A: Copy>(cands: &[Candidate<A>], deterministic: bool, what: &str) -> Result<Candidate<A>> {
    let fits = cands
        .iter()
        .filter(|c| c.2 <= MAX_WORKSPACE && c.1.is_finite());
    let best = if deterministic {
        fits.filter(|c| c.3).min_by(|a, b| a.1.total_cmp(&b.1))
    } else {
        fits.min_by(|a, b| a.1.total_cmp(&b.1))
    };
    match best {
        Some(c) => Ok(*c),
        None if deterministic && !cands.is_empty() => {
            bail!("cuDNN: no deterministic algorithm for {what} (run without --deterministic)")
        }
        None => bail!("cuDNN: no algorithm ran for {what}"),
    }
}

/// A convolution descriptor of `s` with math type `math`.
fn conv_desc(
    s: &ConvShape,
    math: sys::cudnnMathType_t,
) -> Result<sys::cudnnConvolutionDescriptor_t> {
    let i = |v: usize| v as i32;
    let mut d = std::ptr::null_mut();
    unsafe {
        check(sys::cudnnCreateConvolutionDescriptor(&mut d), "conv desc")?;
        let set = || -> Result<()> {
            check(
                sys::cudnnSetConvolution2dDescriptor(
                    d,
                    i(s.pad),
                    i(s.pad),
                    i(s.stride),
                    i(s.stride),
                    1,
                    1,
                    sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                    sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
                ),
                "set conv desc",
            )?;
            check(sys::cudnnSetConvolutionMathType(d, math), "math type")?;
            if s.groups > 1 {
                check(sys::cudnnSetConvolutionGroupCount(d, i(s.groups)), "groups")?;
            }
            Ok(())
        };
        if let Err(e) = set() {
            sys::cudnnDestroyConvolutionDescriptor(d);
            return Err(e);
        }
    }
    Ok(d)
}

impl State {
    fn new(dev: &CudaDevice) -> Result<Self> {
        let mut handle = std::ptr::null_mut();
        check(unsafe { sys::cudnnCreate(&mut handle) }, "create")?;
        let stream = dev.cuda_stream().cu_stream() as sys::cudaStream_t;
        check(unsafe { sys::cudnnSetStream(handle, stream) }, "set stream")?;
        Ok(Self {
            handle,
            plans: HashMap::new(),
            workspace: None,
            last_thread: std::thread::current().id(),
            table: None,
            searched: 0,
            from_disk: 0,
        })
    }

    fn plan(&mut self, dev: &CudaDevice, s: ConvShape) -> Result<Arc<Plan>> {
        let det = deterministic();
        if let Some(p) = self.plans.get(&(s, det)) {
            return Ok(p.clone());
        }
        if self.table.is_none() {
            // Without the device's identity there is no safe key: no disk cache then.
            self.table = Some(match super::device::DeviceInfo::of(dev) {
                Ok(info) => JsonTable::load(
                    DiskCache::global(),
                    format!("cudnn/{}.json", info.cache_key()),
                ),
                Err(_) => JsonTable::load(&DiskCache::at(None), ""),
            });
        }
        let key = s.cache_key(det);
        let stored = self.table.as_ref().and_then(|t| t.get(&key));
        let plan = match stored.and_then(|c| self.make_plan(s, det, Some(c)).ok()) {
            Some(p) => {
                self.from_disk += 1;
                p
            }
            None => {
                let p = self.make_plan(s, det, None)?;
                self.searched += 1;
                let choice = [
                    [p.fwd.algo as u32, p.fwd.math as u32],
                    [p.bwd_data.algo as u32, p.bwd_data.math as u32],
                    [p.bwd_filter.algo as u32, p.bwd_filter.math as u32],
                ];
                if let Some(t) = self.table.as_mut() {
                    t.insert(key, choice);
                }
                p
            }
        };
        let p = Arc::new(plan);
        self.plans.insert((s, det), p.clone());
        Ok(p)
    }

    /// The plan of `s`: with the `stored` choice (checked against cuDNN), or searched.
    fn make_plan(&self, s: ConvShape, det: bool, stored: Option<StoredChoice>) -> Result<Plan> {
        use sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16 as BF16;
        use sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC as NHWC;
        let i = |v: usize| v as i32;
        let (oh, ow) = s.out_hw();
        let mut plan = Plan {
            x: std::ptr::null_mut(),
            y: std::ptr::null_mut(),
            w: std::ptr::null_mut(),
            fwd: Direction {
                conv: std::ptr::null_mut(),
                algo: FWD_ALGOS[0],
                math: MATH_TYPES[0],
                workspace: 0,
            },
            bwd_data: Direction {
                conv: std::ptr::null_mut(),
                algo: BWD_DATA_ALGOS[0],
                math: MATH_TYPES[0],
                workspace: 0,
            },
            bwd_filter: Direction {
                conv: std::ptr::null_mut(),
                algo: BWD_FILTER_ALGOS[0],
                math: MATH_TYPES[0],
                workspace: 0,
            },
            cached: stored.is_some(),
        };
        unsafe {
            check(sys::cudnnCreateTensorDescriptor(&mut plan.x), "x desc")?;
            check(sys::cudnnCreateTensorDescriptor(&mut plan.y), "y desc")?;
            check(sys::cudnnCreateFilterDescriptor(&mut plan.w), "w desc")?;
            check(
                sys::cudnnSetTensor4dDescriptor(plan.x, NHWC, BF16, i(s.n), i(s.c), i(s.h), i(s.w)),
                "set x desc",
            )?;
            check(
                sys::cudnnSetTensor4dDescriptor(plan.y, NHWC, BF16, i(s.n), i(s.k), i(oh), i(ow)),
                "set y desc",
            )?;
            check(
                sys::cudnnSetFilter4dDescriptor(
                    plan.w,
                    BF16,
                    NHWC,
                    i(s.k),
                    i(s.c / s.groups),
                    i(s.r),
                    i(s.r),
                ),
                "set w desc",
            )?;
        }
        match stored {
            Some(c) => self.use_stored(&mut plan, &s, c)?,
            None => self.search(&mut plan, &s, det)?,
        }
        Ok(plan)
    }

    /// Sets each direction from a stored choice; an error when cuDNN refuses one of them.
    fn use_stored(&self, plan: &mut Plan, s: &ConvShape, c: StoredChoice) -> Result<()> {
        let bad = || Error::Msg(format!("cuDNN: stored algorithms {c:?} unknown"));
        let math = |v: u32| from_stored(&MATH_TYPES, v).ok_or_else(bad);
        plan.fwd.algo = from_stored(&FWD_ALGOS, c[0][0]).ok_or_else(bad)?;
        plan.fwd.math = math(c[0][1])?;
        plan.bwd_data.algo = from_stored(&BWD_DATA_ALGOS, c[1][0]).ok_or_else(bad)?;
        plan.bwd_data.math = math(c[1][1])?;
        plan.bwd_filter.algo = from_stored(&BWD_FILTER_ALGOS, c[2][0]).ok_or_else(bad)?;
        plan.bwd_filter.math = math(c[2][1])?;
        plan.fwd.conv = conv_desc(s, plan.fwd.math)?;
        plan.bwd_data.conv = conv_desc(s, plan.bwd_data.math)?;
        plan.bwd_filter.conv = conv_desc(s, plan.bwd_filter.math)?;
        unsafe {
            check(
                sys::cudnnGetConvolutionForwardWorkspaceSize(
                    self.handle,
                    plan.x,
                    plan.w,
                    plan.fwd.conv,
                    plan.y,
                    plan.fwd.algo,
                    &mut plan.fwd.workspace,
                ),
                "stored forward algorithm",
            )?;
            check(
                sys::cudnnGetConvolutionBackwardDataWorkspaceSize(
                    self.handle,
                    plan.w,
                    plan.y,
                    plan.bwd_data.conv,
                    plan.x,
                    plan.bwd_data.algo,
                    &mut plan.bwd_data.workspace,
                ),
                "stored backward-data algorithm",
            )?;
            check(
                sys::cudnnGetConvolutionBackwardFilterWorkspaceSize(
                    self.handle,
                    plan.x,
                    plan.y,
                    plan.bwd_filter.conv,
                    plan.w,
                    plan.bwd_filter.algo,
                    &mut plan.bwd_filter.workspace,
                ),
                "stored backward-filter algorithm",
            )?;
        }
        if [
            plan.fwd.workspace,
            plan.bwd_data.workspace,
            plan.bwd_filter.workspace,
        ]
        .iter()
        .any(|&w| w > MAX_WORKSPACE)
        {
            bail!("cuDNN: a stored algorithm needs more than the workspace cap")
        }
        Ok(())
    }

    /// Times every algorithm of each direction (tensor-op maths allowed, so both math types are
    /// reported) and takes the policy's choice, with its math type.
    fn search(&self, plan: &mut Plan, s: &ConvShape, det: bool) -> Result<()> {
        let what = |dir: &str| format!("{dir} of {s:?}");
        let search = conv_desc(s, sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH)?;
        let ok = sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS;
        let is_det = |d: sys::cudnnDeterminism_t| d == sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC;
        let result = (|| -> Result<()> {
            unsafe {
                let mut max = 0;
                check(
                    sys::cudnnGetConvolutionForwardAlgorithmMaxCount(self.handle, &mut max),
                    "forward algorithm count",
                )?;
                let mut perf = vec![
                    std::mem::zeroed::<sys::cudnnConvolutionFwdAlgoPerf_t>();
                    max.max(1) as usize
                ];
                let mut n = 0;
                check(
                    sys::cudnnFindConvolutionForwardAlgorithm(
                        self.handle,
                        plan.x,
                        plan.w,
                        search,
                        plan.y,
                        perf.len() as i32,
                        &mut n,
                        perf.as_mut_ptr(),
                    ),
                    "find forward algorithm",
                )?;
                let c: Vec<_> = perf[..n as usize]
                    .iter()
                    .filter(|p| p.status == ok)
                    .map(|p| (p.algo, p.time, p.memory, is_det(p.determinism), p.mathType))
                    .collect();
                let (algo, _, ws, _, math) = pick(&c, det, &what("forward"))?;
                plan.fwd.algo = algo;
                plan.fwd.math = math;
                plan.fwd.workspace = ws;

                check(
                    sys::cudnnGetConvolutionBackwardDataAlgorithmMaxCount(self.handle, &mut max),
                    "backward-data algorithm count",
                )?;
                let mut perf = vec![
                    std::mem::zeroed::<sys::cudnnConvolutionBwdDataAlgoPerf_t>();
                    max.max(1) as usize
                ];
                check(
                    sys::cudnnFindConvolutionBackwardDataAlgorithm(
                        self.handle,
                        plan.w,
                        plan.y,
                        search,
                        plan.x,
                        perf.len() as i32,
                        &mut n,
                        perf.as_mut_ptr(),
                    ),
                    "find backward-data algorithm",
                )?;
                let c: Vec<_> = perf[..n as usize]
                    .iter()
                    .filter(|p| p.status == ok)
                    .map(|p| (p.algo, p.time, p.memory, is_det(p.determinism), p.mathType))
                    .collect();
                let (algo, _, ws, _, math) = pick(&c, det, &what("backward data"))?;
                plan.bwd_data.algo = algo;
                plan.bwd_data.math = math;
                plan.bwd_data.workspace = ws;

                check(
                    sys::cudnnGetConvolutionBackwardFilterAlgorithmMaxCount(self.handle, &mut max),
                    "backward-filter algorithm count",
                )?;
                let mut perf = vec![
                    std::mem::zeroed::<sys::cudnnConvolutionBwdFilterAlgoPerf_t>();
                    max.max(1) as usize
                ];
                check(
                    sys::cudnnFindConvolutionBackwardFilterAlgorithm(
                        self.handle,
                        plan.x,
                        plan.y,
                        search,
                        plan.w,
                        perf.len() as i32,
                        &mut n,
                        perf.as_mut_ptr(),
                    ),
                    "find backward-filter algorithm",
                )?;
                let c: Vec<_> = perf[..n as usize]
                    .iter()
                    .filter(|p| p.status == ok)
                    .map(|p| (p.algo, p.time, p.memory, is_det(p.determinism), p.mathType))
                    .collect();
                let (algo, _, ws, _, math) = pick(&c, det, &what("backward filter"))?;
                plan.bwd_filter.algo = algo;
                plan.bwd_filter.math = math;
                plan.bwd_filter.workspace = ws;
            }
            plan.fwd.conv = conv_desc(s, plan.fwd.math)?;
            plan.bwd_data.conv = conv_desc(s, plan.bwd_data.math)?;
            plan.bwd_filter.conv = conv_desc(s, plan.bwd_filter.math)?;
            Ok(())
        })();
        unsafe { sys::cudnnDestroyConvolutionDescriptor(search) };
        result
    }

    /// The shared workspace, at least `bytes` long; returns (address, length).
    fn workspace(&mut self, dev: &CudaDevice, bytes: usize) -> Result<(u64, usize)> {
        if bytes == 0 {
            return Ok((0, 0));
        }
        let grow = self.workspace.as_ref().is_none_or(|w| w.len() < bytes);
        if grow {
            // The old buffer is freed in stream order, after the kernels queued before.
            self.workspace = Some(unsafe { dev.alloc::<u8>(bytes) }?);
        }
        let ws = self.workspace.as_mut().expect("allocated above");
        let stream = dev.cuda_stream();
        let len = ws.len();
        let (ptr, _sync) = ws.device_ptr_mut(&stream);
        Ok((ptr, len))
    }
}

/// Runs `f` with the cuDNN state of `dev`'s GPU and the plan of `shape`.
fn with_plan<T>(
    dev: &CudaDevice,
    shape: ConvShape,
    f: impl FnOnce(&mut State, &Plan) -> Result<T>,
) -> Result<T> {
    let mut guard = states()
        .lock()
        .map_err(|_| Error::Msg("cuDNN state poisoned".into()))?;
    let ctx = dev.cuda_stream().context().clone();
    let st = match guard.entry(ctx.ordinal()) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => e.insert(State::new(dev)?),
    };
    let me = std::thread::current().id();
    if st.last_thread != me {
        // Another thread's stream may still use the workspace: wait for the whole device.
        ctx.synchronize().map_err(Error::wrap)?;
        st.last_thread = me;
    }
    let plan = st.plan(dev, shape)?;
    f(st, &plan)
}

/// The algorithms, math types and workspace sizes chosen for `shape` (for benchmarks and logs).
pub fn describe(dev: &CudaDevice, shape: ConvShape) -> Result<String> {
    with_plan(dev, shape, |_, p| {
        Ok(format!(
            "fwd {:?} {:?} ({} B), bwd data {:?} {:?} ({} B), bwd filter {:?} {:?} ({} B){}",
            p.fwd.algo,
            p.fwd.math,
            p.fwd.workspace,
            p.bwd_data.algo,
            p.bwd_data.math,
            p.bwd_data.workspace,
            p.bwd_filter.algo,
            p.bwd_filter.math,
            p.bwd_filter.workspace,
            if p.cached {
                ", from the disk cache"
            } else {
                ""
            }
        ))
    })
}

/// How many shapes of `dev`'s GPU were searched and how many were read from the disk cache, and
/// where that cache is (for logs: a second process should search none).
pub fn plan_stats(dev: &CudaDevice) -> (usize, usize, Option<std::path::PathBuf>) {
    let ordinal = dev.cuda_stream().context().ordinal();
    let guard = states().lock().expect("cuDNN state poisoned");
    let (searched, from_disk) = guard
        .get(&ordinal)
        .map_or((0, 0), |s| (s.searched, s.from_disk));
    (
        searched,
        from_disk,
        DiskCache::global().root().map(|r| r.join("cudnn")),
    )
}

fn cuda_only(name: &str) -> Result<(CpuStorage, Shape)> {
    bail!("{name}: CUDA only (the CPU path of trainer::ops::nhwc does not use this op)")
}

fn expect_bf16(s: &CudaStorage, what: &str) -> Result<()> {
    if s.dtype() != DType::BF16 {
        bail!("cudnn conv: {what} must be bf16, got {:?}", s.dtype())
    }
    Ok(())
}

/// Forward convolution `y = conv(x, w)`, with cuDNN backward passes.
#[derive(Clone, Copy, Debug)]
pub struct Conv2dNhwc {
    /// Stride.
    pub stride: usize,
    /// Padding.
    pub pad: usize,
    /// Groups.
    pub groups: usize,
}

impl Conv2dNhwc {
    fn shape(&self, x: &Layout, w: &Layout) -> Result<ConvShape> {
        let (n, h, wd, c) = x.shape().dims4()?;
        let (k, r, s, cg) = w.shape().dims4()?;
        if r != s || cg * self.groups != c || k % self.groups != 0 {
            bail!(
                "conv2d nhwc: input {:?} and filter {:?} (KRSC) do not fit {} groups",
                x.shape(),
                w.shape(),
                self.groups
            )
        }
        if h + 2 * self.pad < r || wd + 2 * self.pad < r {
            bail!(
                "conv2d nhwc: input {:?} smaller than the {r}x{r} kernel",
                x.shape()
            )
        }
        Ok(ConvShape {
            n,
            h,
            w: wd,
            c,
            k,
            r,
            stride: self.stride,
            pad: self.pad,
            groups: self.groups,
        })
    }
}

impl CustomOp2 for Conv2dNhwc {
    fn name(&self) -> &'static str {
        "conv2d-nhwc-cudnn"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cuda_only(self.name())
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        expect_bf16(xs, "input")?;
        expect_bf16(ws, "filter")?;
        let s = self.shape(xl, wl)?;
        let dev = xs.device().clone();
        let (xp, wp) = (storage_ptr(xs, xl)?, storage_ptr(ws, wl)?);
        let y = unsafe { alloc_storage(&dev, DType::BF16, s.y_len()) }?;
        let yp = storage_ptr(&y, &Layout::contiguous(s.y_len()))?;
        let _t = super::profile::scope(&dev, "conv forward");
        with_plan(&dev, s, |st, p| {
            let (wsp, wsl) = st.workspace(&dev, p.fwd.workspace)?;
            let (one, zero) = (1f32, 0f32);
            check(
                unsafe {
                    sys::cudnnConvolutionForward(
                        st.handle,
                        &one as *const f32 as *const _,
                        p.x,
                        xp as *const _,
                        p.w,
                        wp as *const _,
                        p.fwd.conv,
                        p.fwd.algo,
                        wsp as *mut _,
                        wsl,
                        &zero as *const f32 as *const _,
                        p.y,
                        yp as *mut _,
                    )
                },
                "convolution forward",
            )
        })?;
        let (oh, ow) = s.out_hw();
        Ok((y, Shape::from((s.n, oh, ow, s.k))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.to_dtype(DType::BF16)?.contiguous()?;
        let dx = self.backward_data(&dy, w, x.dims4()?)?;
        let dw = self.backward_filter(x, &dy, w.dims4()?)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl Conv2dNhwc {
    /// `dx` (bf16 NHWC, shape `x_dims`) from the output gradient `dy` (bf16 NHWC, contiguous)
    /// and the bf16 KRSC filter `w`.
    pub fn backward_data(
        &self,
        dy: &Tensor,
        w: &Tensor,
        x_dims: (usize, usize, usize, usize),
    ) -> Result<Tensor> {
        dy.apply_op2_no_bwd(
            w,
            &ConvBackwardData {
                conv: *self,
                x_dims,
            },
        )
    }

    /// `dw` (bf16 KRSC, shape `w_dims`) from the input `x` and the output gradient `dy` (both
    /// bf16 NHWC, contiguous).
    pub fn backward_filter(
        &self,
        x: &Tensor,
        dy: &Tensor,
        w_dims: (usize, usize, usize, usize),
    ) -> Result<Tensor> {
        x.apply_op2_no_bwd(
            dy,
            &ConvBackwardFilter {
                conv: *self,
                w_dims,
            },
        )
    }
}

/// `dx` from `(dy, w)`.
#[derive(Clone, Copy, Debug)]
struct ConvBackwardData {
    conv: Conv2dNhwc,
    x_dims: (usize, usize, usize, usize),
}

impl CustomOp2 for ConvBackwardData {
    fn name(&self) -> &'static str {
        "conv2d-nhwc-cudnn-backward-data"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cuda_only(self.name())
    }

    fn cuda_fwd(
        &self,
        dys: &CudaStorage,
        dyl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        expect_bf16(dys, "output gradient")?;
        let xl = Layout::contiguous(self.x_dims);
        let s = self.conv.shape(&xl, wl)?;
        let (oh, ow) = s.out_hw();
        if dyl.shape().dims() != [s.n, oh, ow, s.k] {
            bail!(
                "conv2d nhwc backward: gradient {:?} does not fit {s:?}",
                dyl.shape()
            )
        }
        let dev = dys.device().clone();
        let (dyp, wp) = (storage_ptr(dys, dyl)?, storage_ptr(ws, wl)?);
        let dx = unsafe { alloc_storage(&dev, DType::BF16, s.x_len()) }?;
        let dxp = storage_ptr(&dx, &Layout::contiguous(s.x_len()))?;
        let _t = super::profile::scope(&dev, "conv backward data");
        with_plan(&dev, s, |st, p| {
            let (wsp, wsl) = st.workspace(&dev, p.bwd_data.workspace)?;
            let (one, zero) = (1f32, 0f32);
            check(
                unsafe {
                    sys::cudnnConvolutionBackwardData(
                        st.handle,
                        &one as *const f32 as *const _,
                        p.w,
                        wp as *const _,
                        p.y,
                        dyp as *const _,
                        p.bwd_data.conv,
                        p.bwd_data.algo,
                        wsp as *mut _,
                        wsl,
                        &zero as *const f32 as *const _,
                        p.x,
                        dxp as *mut _,
                    )
                },
                "convolution backward data",
            )
        })?;
        Ok((dx, Shape::from(self.x_dims)))
    }
}

/// `dw` from `(x, dy)`.
#[derive(Clone, Copy, Debug)]
struct ConvBackwardFilter {
    conv: Conv2dNhwc,
    w_dims: (usize, usize, usize, usize),
}

impl CustomOp2 for ConvBackwardFilter {
    fn name(&self) -> &'static str {
        "conv2d-nhwc-cudnn-backward-filter"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cuda_only(self.name())
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        dys: &CudaStorage,
        dyl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        expect_bf16(xs, "input")?;
        expect_bf16(dys, "output gradient")?;
        let wl = Layout::contiguous(self.w_dims);
        let s = self.conv.shape(xl, &wl)?;
        let (xp, dyp) = (storage_ptr(xs, xl)?, storage_ptr(dys, dyl)?);
        let dev = xs.device().clone();
        let dw = unsafe { alloc_storage(&dev, DType::BF16, s.w_len()) }?;
        let dwp = storage_ptr(&dw, &Layout::contiguous(s.w_len()))?;
        let _t = super::profile::scope(&dev, "conv backward filter");
        with_plan(&dev, s, |st, p| {
            let (wsp, wsl) = st.workspace(&dev, p.bwd_filter.workspace)?;
            let (one, zero) = (1f32, 0f32);
            check(
                unsafe {
                    sys::cudnnConvolutionBackwardFilter(
                        st.handle,
                        &one as *const f32 as *const _,
                        p.x,
                        xp as *const _,
                        p.y,
                        dyp as *const _,
                        p.bwd_filter.conv,
                        p.bwd_filter.algo,
                        wsp as *mut _,
                        wsl,
                        &zero as *const f32 as *const _,
                        p.w,
                        dwp as *mut _,
                    )
                },
                "convolution backward filter",
            )
        })?;
        Ok((dw, Shape::from(self.w_dims)))
    }
}
