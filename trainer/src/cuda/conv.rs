//! cuDNN convolutions on channels-last bf16 tensors: forward, backward data and backward filter
//! as candle custom ops.
//!
//! Layouts: input `[N, H, W, C]`, filter `[K, R, S, C / groups]` (cuDNN's NHWC filter format,
//! "KRSC"), output `[N, OH, OW, K]`, all contiguous bf16; accumulation and `alpha`/`beta` in f32
//! (`CUDNN_DATA_FLOAT` compute type), tensor-core maths allowed.
//!
//! Per shape, the three algorithms are chosen once with `cudnnFind*Algorithm` (cuDNN runs the
//! candidates and times them, as PyTorch's `cudnn.benchmark = True`) and cached with their
//! workspace sizes. Among algorithms within 10 % of the fastest, a deterministic one is preferred,
//! so a run stays a function of its seed where cuDNN allows it. One workspace buffer per process
//! is grown to the largest size seen and reused by every call (all calls are on candle's stream).
//!
//! The calls go through cudarc's raw cuDNN bindings because its safe wrappers only expose the
//! heuristic algorithm choice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::sys;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtrMut};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{bail, CpuStorage, CustomOp2, DType, Error, Layout, Result, Shape, Tensor};

use super::{alloc_storage, storage_ptr};

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
    /// Input height and width.
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
}

/// The descriptors and chosen algorithms of one shape.
struct Plan {
    x: sys::cudnnTensorDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
    fwd: sys::cudnnConvolutionFwdAlgo_t,
    bwd_data: sys::cudnnConvolutionBwdDataAlgo_t,
    bwd_filter: sys::cudnnConvolutionBwdFilterAlgo_t,
    ws_fwd: usize,
    ws_bwd_data: usize,
    ws_bwd_filter: usize,
}

impl Drop for Plan {
    fn drop(&mut self) {
        unsafe {
            sys::cudnnDestroyTensorDescriptor(self.x);
            sys::cudnnDestroyTensorDescriptor(self.y);
            sys::cudnnDestroyFilterDescriptor(self.w);
            sys::cudnnDestroyConvolutionDescriptor(self.conv);
        }
    }
}

/// The per-process cuDNN state: handle (bound to candle's stream), plans, workspace.
struct State {
    device: CudaDevice,
    handle: sys::cudnnHandle_t,
    plans: HashMap<ConvShape, Arc<Plan>>,
    workspace: Option<CudaSlice<u8>>,
}

// The raw handles are only used under the state's mutex, on candle's single stream.
unsafe impl Send for State {}
unsafe impl Send for Plan {}
unsafe impl Sync for Plan {}

fn state() -> &'static Mutex<Option<State>> {
    static STATE: OnceLock<Mutex<Option<State>>> = OnceLock::new();
    STATE.get_or_init(|| Mutex::new(None))
}

/// Cap on the workspace of one algorithm (larger ones are not considered).
const MAX_WORKSPACE: usize = 2 << 30;

fn pick<A: Copy>(cands: &[(A, f32, usize, bool)]) -> Result<(A, usize)> {
    let best = cands
        .iter()
        .filter(|c| c.2 <= MAX_WORKSPACE)
        .map(|c| c.1)
        .fold(f32::INFINITY, f32::min);
    if !best.is_finite() {
        bail!("cuDNN: no algorithm ran for this convolution")
    }
    let ok = |c: &&(A, f32, usize, bool)| c.2 <= MAX_WORKSPACE && c.1 <= best * 1.10;
    let chosen = cands
        .iter()
        .filter(ok)
        .find(|c| c.3)
        .or_else(|| cands.iter().find(|c| c.2 <= MAX_WORKSPACE && c.1 == best))
        .expect("best exists");
    Ok((chosen.0, chosen.2))
}

impl State {
    fn new(device: &CudaDevice) -> Result<Self> {
        let mut handle = std::ptr::null_mut();
        check(unsafe { sys::cudnnCreate(&mut handle) }, "create")?;
        let stream = device.cuda_stream().cu_stream() as sys::cudaStream_t;
        check(unsafe { sys::cudnnSetStream(handle, stream) }, "set stream")?;
        Ok(Self {
            device: device.clone(),
            handle,
            plans: HashMap::new(),
            workspace: None,
        })
    }

    fn plan(&mut self, s: ConvShape) -> Result<Arc<Plan>> {
        if let Some(p) = self.plans.get(&s) {
            return Ok(p.clone());
        }
        let p = Arc::new(self.make_plan(s)?);
        self.plans.insert(s, p.clone());
        Ok(p)
    }

    fn make_plan(&self, s: ConvShape) -> Result<Plan> {
        use sys::cudnnDataType_t::{CUDNN_DATA_BFLOAT16 as BF16, CUDNN_DATA_FLOAT as F32};
        use sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC as NHWC;
        let i = |v: usize| v as i32;
        let (oh, ow) = s.out_hw();
        let mut plan = Plan {
            x: std::ptr::null_mut(),
            y: std::ptr::null_mut(),
            w: std::ptr::null_mut(),
            conv: std::ptr::null_mut(),
            fwd: sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
            bwd_data: sys::cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
            bwd_filter: sys::cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
            ws_fwd: 0,
            ws_bwd_data: 0,
            ws_bwd_filter: 0,
        };
        unsafe {
            check(sys::cudnnCreateTensorDescriptor(&mut plan.x), "x desc")?;
            check(sys::cudnnCreateTensorDescriptor(&mut plan.y), "y desc")?;
            check(sys::cudnnCreateFilterDescriptor(&mut plan.w), "w desc")?;
            check(
                sys::cudnnCreateConvolutionDescriptor(&mut plan.conv),
                "conv desc",
            )?;
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
            check(
                sys::cudnnSetConvolution2dDescriptor(
                    plan.conv,
                    i(s.pad),
                    i(s.pad),
                    i(s.stride),
                    i(s.stride),
                    1,
                    1,
                    sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                    F32,
                ),
                "set conv desc",
            )?;
            check(
                sys::cudnnSetConvolutionMathType(
                    plan.conv,
                    sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
                ),
                "math type",
            )?;
            if s.groups > 1 {
                check(
                    sys::cudnnSetConvolutionGroupCount(plan.conv, i(s.groups)),
                    "groups",
                )?;
            }

            let det = sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC;
            let ok = sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS;

            let mut n = 0;
            let mut perf = [std::mem::zeroed::<sys::cudnnConvolutionFwdAlgoPerf_t>(); 8];
            check(
                sys::cudnnFindConvolutionForwardAlgorithm(
                    self.handle,
                    plan.x,
                    plan.w,
                    plan.conv,
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
                .map(|p| (p.algo, p.time, p.memory, p.determinism == det))
                .collect();
            (plan.fwd, plan.ws_fwd) = pick(&c)?;

            let mut perf = [std::mem::zeroed::<sys::cudnnConvolutionBwdDataAlgoPerf_t>(); 8];
            check(
                sys::cudnnFindConvolutionBackwardDataAlgorithm(
                    self.handle,
                    plan.w,
                    plan.y,
                    plan.conv,
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
                .map(|p| (p.algo, p.time, p.memory, p.determinism == det))
                .collect();
            (plan.bwd_data, plan.ws_bwd_data) = pick(&c)?;

            let mut perf = [std::mem::zeroed::<sys::cudnnConvolutionBwdFilterAlgoPerf_t>(); 8];
            check(
                sys::cudnnFindConvolutionBackwardFilterAlgorithm(
                    self.handle,
                    plan.x,
                    plan.y,
                    plan.conv,
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
                .map(|p| (p.algo, p.time, p.memory, p.determinism == det))
                .collect();
            (plan.bwd_filter, plan.ws_bwd_filter) = pick(&c)?;
        }
        Ok(plan)
    }

    /// The shared workspace, at least `bytes` long; returns (address, length).
    fn workspace(&mut self, bytes: usize) -> Result<(u64, usize)> {
        if bytes == 0 {
            return Ok((0, 0));
        }
        let grow = self.workspace.as_ref().is_none_or(|w| w.len() < bytes);
        if grow {
            // The old buffer is freed in stream order, after the kernels queued before.
            self.workspace = Some(unsafe { self.device.alloc::<u8>(bytes) }?);
        }
        let ws = self.workspace.as_mut().expect("allocated above");
        let stream = self.device.cuda_stream();
        let len = ws.len();
        let (ptr, _sync) = ws.device_ptr_mut(&stream);
        Ok((ptr, len))
    }
}

/// Runs `f` with the cuDNN state of `dev` and the plan of `shape`.
fn with_plan<T>(
    dev: &CudaDevice,
    shape: ConvShape,
    f: impl FnOnce(&mut State, &Plan) -> Result<T>,
) -> Result<T> {
    let mut guard = state()
        .lock()
        .map_err(|_| Error::Msg("cuDNN state poisoned".into()))?;
    if guard.as_ref().is_some_and(|s| s.device.id() != dev.id()) {
        bail!("cuDNN: the convolution state belongs to another CUDA device (one GPU per process)")
    }
    if guard.is_none() {
        *guard = Some(State::new(dev)?);
    }
    let st = guard.as_mut().expect("set above");
    let plan = st.plan(shape)?;
    f(st, &plan)
}

/// The algorithms and workspace sizes chosen for `shape` (for benchmarks and logs).
pub fn describe(dev: &CudaDevice, shape: ConvShape) -> Result<String> {
    with_plan(dev, shape, |_, p| {
        Ok(format!(
            "fwd {:?} ({} B), bwd data {:?} ({} B), bwd filter {:?} ({} B)",
            p.fwd, p.ws_fwd, p.bwd_data, p.ws_bwd_data, p.bwd_filter, p.ws_bwd_filter
        ))
    })
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
            let (wsp, wsl) = st.workspace(p.ws_fwd)?;
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
                        p.conv,
                        p.fwd,
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
            let (wsp, wsl) = st.workspace(p.ws_bwd_data)?;
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
                        p.conv,
                        p.bwd_data,
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
            let (wsp, wsl) = st.workspace(p.ws_bwd_filter)?;
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
                        p.conv,
                        p.bwd_filter,
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
