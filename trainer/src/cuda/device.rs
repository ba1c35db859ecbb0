//! Opening a CUDA device the way the fast path needs it, and what it is (for logs, benchmark
//! lines and the keys of the start-up cache).

use candle_core::cuda_backend::cudarc::driver::sys;
use candle_core::cuda_backend::CudaDevice;
use candle_core::{Device, Error, Result};

/// Opens GPU `ordinal` for training or evaluation:
///
/// * cudarc's per-allocation event tracking is turned off. It exists for programs that use
///   several streams without ordering them; here every kernel runs on candle's stream, and the
///   one other stream (the feed's copies, `cuda::feed`) is ordered by explicit events. With it on,
///   every allocation creates two CUDA events and destroys them when freed, host work on every
///   tensor of every step.
/// * the default memory pool keeps freed memory ([`super::memory::keep_freed_memory`]), so a
///   synchronisation does not hand the step's activations back to the driver.
///
/// Every device a process uses should be opened here (tests too), so the settings hold for all
/// of its tensors.
pub fn open(ordinal: usize) -> Result<Device> {
    let Device::Cuda(dev) = Device::new_cuda(ordinal)? else {
        unreachable!("new_cuda gives a CUDA device")
    };
    // SAFETY: see above: one compute stream; the feed's copy stream is ordered by its own events,
    // and its buffers are freed only after that stream has been synchronised.
    unsafe { dev.disable_event_tracking() };
    super::memory::keep_freed_memory(&dev)?;
    Ok(Device::Cuda(dev))
}

/// What a device and the CUDA libraries this process loaded are.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeviceInfo {
    /// The GPU's name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Its UUID in hex.
    pub uuid: String,
    /// Compute capability `(major, minor)`.
    pub compute_capability: (i32, i32),
    /// The driver's CUDA version, e.g. `13.0` (from `cuDriverGetVersion`).
    pub driver_cuda: String,
    /// The NVRTC library's version.
    pub nvrtc: String,
    /// The cuDNN library's version number (e.g. 91900 for 9.19.0).
    pub cudnn: usize,
}

impl DeviceInfo {
    /// The information of `dev`.
    pub fn of(dev: &CudaDevice) -> Result<Self> {
        let ctx = dev.cuda_stream().context().clone();
        let uuid = ctx.uuid().map_err(Error::wrap)?;
        let mut driver = 0i32;
        // SAFETY: one out-parameter.
        let r = unsafe { sys::cuDriverGetVersion(&mut driver) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(Error::Msg(format!("CUDA driver version: {r:?}")));
        }
        let (nv_major, nv_minor) = super::kernels::nvrtc_version()?;
        Ok(Self {
            name: ctx.name().map_err(Error::wrap)?,
            uuid: uuid
                .bytes
                .iter()
                .map(|b| format!("{:02x}", *b as u8))
                .collect(),
            compute_capability: ctx.compute_capability().map_err(Error::wrap)?,
            driver_cuda: format!("{}.{}", driver / 1000, (driver % 1000) / 10),
            nvrtc: format!("{nv_major}.{nv_minor}"),
            cudnn: candle_core::cuda_backend::cudarc::cudnn::result::get_version(),
        })
    }

    /// A file-name-safe key of the device and library versions (for the start-up cache).
    pub fn cache_key(&self) -> String {
        crate::disk_cache::sanitize(&format!(
            "{}-{}-cc{}{}-cuda{}-cudnn{}",
            self.name,
            &self.uuid[..self.uuid.len().min(8)],
            self.compute_capability.0,
            self.compute_capability.1,
            self.driver_cuda,
            self.cudnn
        ))
    }
}
