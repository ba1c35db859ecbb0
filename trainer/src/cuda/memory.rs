//! Device memory figures: the high-water mark of memory in use, as PyTorch's
//! `torch.cuda.max_memory_allocated`.
//!
//! cudarc allocates stream-ordered (`cuMemAllocAsync`) from the device's default memory pool, so
//! the pool's `USED_MEM_HIGH` attribute is the peak of bytes held by live allocations (tensors,
//! the cuDNN workspace), not what the pool reserved. cuDNN's own benchmarking buffers during
//! algorithm search are outside the pool and not counted (PyTorch's figure excludes them too).

use candle_core::cuda_backend::cudarc::driver::sys;
use candle_core::cuda_backend::CudaDevice;
use candle_core::{Error, Result};

fn check(r: sys::CUresult, what: &str) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(Error::Msg(format!("CUDA {what}: {r:?}")))
    }
}

fn default_pool(dev: &CudaDevice) -> Result<sys::CUmemoryPool> {
    let ctx = dev.cuda_stream().context().clone();
    ctx.bind_to_thread().map_err(Error::wrap)?;
    let mut pool = std::ptr::null_mut();
    check(
        unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) },
        "default memory pool",
    )?;
    Ok(pool)
}

/// Peak bytes in use in the default pool since the last [`reset_peak_used`].
pub fn peak_used(dev: &CudaDevice) -> Result<u64> {
    let pool = default_pool(dev)?;
    let mut v: u64 = 0;
    check(
        unsafe {
            sys::cuMemPoolGetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut v as *mut u64 as *mut _,
            )
        },
        "pool attribute",
    )?;
    Ok(v)
}

/// Restarts the peak at the current use.
pub fn reset_peak_used(dev: &CudaDevice) -> Result<()> {
    let pool = default_pool(dev)?;
    let mut zero: u64 = 0;
    check(
        unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut zero as *mut u64 as *mut _,
            )
        },
        "reset pool peak",
    )
}

/// `(free, total)` device memory in bytes.
pub fn mem_info(dev: &CudaDevice) -> Result<(usize, usize)> {
    dev.cuda_stream()
        .context()
        .bind_to_thread()
        .map_err(Error::wrap)?;
    let (mut free, mut total) = (0usize, 0usize);
    check(
        unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) },
        "memory info",
    )?;
    Ok((free, total))
}

/// Makes the default pool keep freed memory instead of handing it back to the driver whenever
/// the stream synchronises (the release threshold's default is 0 bytes), so a training step
/// reuses the previous step's memory instead of regrowing the pool. PyTorch's caching allocator
/// keeps freed blocks the same way.
pub fn keep_freed_memory(dev: &CudaDevice) -> Result<()> {
    let pool = default_pool(dev)?;
    let mut threshold: u64 = u64::MAX;
    check(
        unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut _,
            )
        },
        "pool release threshold",
    )
}

/// The default pool's release threshold in bytes.
pub fn release_threshold(dev: &CudaDevice) -> Result<u64> {
    let pool = default_pool(dev)?;
    let mut v: u64 = 0;
    check(
        unsafe {
            sys::cuMemPoolGetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut v as *mut u64 as *mut _,
            )
        },
        "pool release threshold",
    )?;
    Ok(v)
}
