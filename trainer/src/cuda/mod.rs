//! The CUDA fast path (feature `cuda`): cuDNN convolutions in NHWC, fused BatchNorm and pooling
//! kernels, a multi-tensor LAMB, and the host-to-device feed.
//!
//! Everything here works on candle tensors that live on candle's CUDA stream: the ops are candle
//! custom ops (so autograd, the graph and the allocator stay candle's), and their kernels are
//! compiled once per process with NVRTC ([`kernels`]). The layer functions in
//! [`crate::ops::nhwc`] pick these on a CUDA device and a CPU reference elsewhere, which is what
//! the tests compare.

pub mod bn;
pub mod conv;
pub mod device;
pub mod feed;
pub mod kernels;
pub mod lamb;
pub mod memory;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod pool;
pub mod profile;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DevicePtr;
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{bail, DType, Layout, Result, Storage, Tensor};

/// A CUDA stream of its own beside candle's (the feed's copies, NCCL's collectives), owned here
/// and destroyed on drop after finishing its work.
///
/// It is created with the driver API and wrapped as a borrowed stream, so candle's context stays
/// in single-stream mode: `CudaContext::new_stream` would switch cudarc to multi-stream event
/// tracking, which records and waits on events around every kernel argument of every candle op.
/// Work on it is ordered against candle's stream by explicit events, by its users.
pub(crate) struct SideStream {
    pub(crate) ctx: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>,
    pub(crate) stream: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
}

impl SideStream {
    pub(crate) fn new(
        ctx: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>,
    ) -> Result<Self> {
        use candle_core::cuda_backend::cudarc::driver::result;
        use candle_core::cuda_backend::WrapErr;
        ctx.bind_to_thread().w()?;
        let cu = result::stream::create(result::stream::StreamKind::NonBlocking).w()?;
        // SAFETY: `cu` is a stream just created in `ctx`. This struct owns it: the wrapper never
        // leaves it, and `Drop` destroys the stream only after synchronising it.
        let stream = unsafe { ctx.wrap_borrowed_stream(cu) };
        Ok(SideStream {
            ctx: ctx.clone(),
            stream,
        })
    }
}

impl Drop for SideStream {
    fn drop(&mut self) {
        use candle_core::cuda_backend::cudarc::driver::result;
        let cu = self.stream.cu_stream();
        self.ctx.record_err(self.ctx.bind_to_thread());
        // SAFETY: `cu` was created in `new` and is destroyed once, here, after its work is done.
        unsafe {
            self.ctx.record_err(result::stream::synchronize(cu));
            self.ctx.record_err(result::stream::destroy(cu));
        }
    }
}

/// The raw device address of the first element of a contiguous CUDA tensor, for kernels that
/// take plain pointers (for instance to update a [`candle_core::Var`] in place).
///
/// The address stays valid while `t` (or any tensor sharing its storage) is alive.
pub fn device_ptr(t: &Tensor) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        bail!(
            "device_ptr: tensor is on {:?}, not CUDA",
            t.device().location()
        )
    };
    storage_ptr(cs, layout)
}

/// The raw device address of the first element of `layout` in `cs` (contiguous layouts only).
pub fn storage_ptr(cs: &CudaStorage, layout: &Layout) -> Result<u64> {
    if !layout.is_contiguous() {
        bail!(
            "cuda op: a contiguous input is required, got strides {:?}",
            layout.stride()
        )
    }
    let stream = cs.device().cuda_stream();
    let offset = layout.start_offset() as u64;
    let (base, elem) = match cs.dtype() {
        DType::F32 => (cs.as_cuda_slice::<f32>()?.device_ptr(&stream).0, 4),
        DType::BF16 => (cs.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0, 2),
        DType::F16 => (cs.as_cuda_slice::<half::f16>()?.device_ptr(&stream).0, 2),
        DType::U8 => (cs.as_cuda_slice::<u8>()?.device_ptr(&stream).0, 1),
        DType::U32 => (cs.as_cuda_slice::<u32>()?.device_ptr(&stream).0, 4),
        DType::I64 => (cs.as_cuda_slice::<i64>()?.device_ptr(&stream).0, 8),
        dt => bail!("cuda op: unsupported dtype {dt:?}"),
    };
    Ok(base + offset * elem)
}

/// The CUDA device of a tensor.
pub fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(d) => Ok(d.clone()),
        d => bail!("expected a CUDA tensor, got one on {:?}", d.location()),
    }
}

/// A new uninitialised CUDA tensor storage of `len` elements of `dtype`.
///
/// # Safety
/// The caller writes every element before the storage is read.
pub unsafe fn alloc_storage(dev: &CudaDevice, dtype: DType, len: usize) -> Result<CudaStorage> {
    let len = len.max(1);
    Ok(match dtype {
        DType::F32 => CudaStorage::wrap_cuda_slice(dev.alloc::<f32>(len)?, dev.clone()),
        DType::BF16 => CudaStorage::wrap_cuda_slice(dev.alloc::<half::bf16>(len)?, dev.clone()),
        DType::U8 => CudaStorage::wrap_cuda_slice(dev.alloc::<u8>(len)?, dev.clone()),
        dt => bail!("cuda alloc: unsupported dtype {dt:?}"),
    })
}

/// A zero-filled CUDA tensor storage.
pub fn zeros_storage(dev: &CudaDevice, dtype: DType, len: usize) -> Result<CudaStorage> {
    let len = len.max(1);
    Ok(match dtype {
        DType::F32 => CudaStorage::wrap_cuda_slice(dev.alloc_zeros::<f32>(len)?, dev.clone()),
        DType::BF16 => {
            CudaStorage::wrap_cuda_slice(dev.alloc_zeros::<half::bf16>(len)?, dev.clone())
        }
        DType::U8 => CudaStorage::wrap_cuda_slice(dev.alloc_zeros::<u8>(len)?, dev.clone()),
        dt => bail!("cuda alloc: unsupported dtype {dt:?}"),
    })
}

/// Wraps a storage as a tensor outside the autograd graph.
pub fn tensor_from_storage(storage: CudaStorage, shape: impl Into<candle_core::Shape>) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(storage),
        shape,
        candle_core::op::BackpropOp::none(),
        false,
    )
}

#[cfg(test)]
mod tests {
    /// Every kernel module compiles with NVRTC, to PTX and to H100 machine code (no GPU needed:
    /// libnvrtc from the CUDA toolkit, `eval "$(bash scripts/setup-cuda.sh --env)"` puts it on
    /// `LD_LIBRARY_PATH`).
    #[test]
    fn nvrtc_compiles_every_module() {
        let modules = [
            super::bn::MODULE,
            super::pool::MODULE,
            super::lamb::MODULE,
            super::feed::MODULE,
        ];
        for m in modules {
            let p = super::kernels::ptx(m).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                p.contains(".entry"),
                "{}: no kernel entry in the PTX",
                m.name
            );
            let bin = super::kernels::cubin(m, "sm_90").unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                &bin[..4],
                b"\x7fELF",
                "{}: the CUBIN is not an ELF image",
                m.name
            );
        }
        let (major, minor) = super::kernels::nvrtc_version().unwrap();
        eprintln!("NVRTC {major}.{minor}");
        assert!(major >= 12, "NVRTC {major}.{minor}");
    }
}
