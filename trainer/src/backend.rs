//! The one place that picks a device's implementations of what the training loop uses: the
//! optimizer, the loader's host buffers with the upload that moves batches to the device, and the
//! collective the ranks reduce through. The rest of the crate (the loop, `optim`, `transfer`)
//! is written against the traits and never reaches into `cuda`.
//!
//! | piece | CPU | CUDA |
//! |---|---|---|
//! | LAMB | [`crate::optim::Lamb`] (tensor ops) | `cuda::lamb::CudaLamb` (multi-tensor kernels) |
//! | SGD | [`crate::optim::Sgd`] | the same |
//! | buffers + upload | heap buffers, [`crate::transfer::HostUpload`] | page-locked buffers, `cuda::feed::CudaUpload` |
//! | collective (W > 1) | [`crate::dist::ThreadGroup`] (ranks as threads) | NCCL (`cuda::nccl`, feature `nccl`) |

use candle_core::Device;

use crate::feed::Feed;
use crate::optim::{OptimError, ParamGroup, Sgd, TrainOptimizer};
use crate::recipe::{OptimizerKind, Recipe};
use crate::transfer::{DynStorage, HostUpload, Upload};

/// The recipe's optimizer over `groups` on `device`: LAMB is the multi-tensor CUDA
/// implementation on a CUDA device (a handful of launches per step whatever the tensor count),
/// the tensor-op implementation elsewhere; both have the same semantics and checkpoint state.
pub fn optimizer(
    recipe: &Recipe,
    groups: Vec<ParamGroup>,
    device: &Device,
) -> Result<Box<dyn TrainOptimizer>, OptimError> {
    match recipe.optim.name {
        OptimizerKind::Lamb => lamb(groups, recipe.lamb_config(), device),
        OptimizerKind::Sgd => Ok(Box::new(Sgd::new(groups, recipe.sgd_config())?)),
    }
}

/// LAMB with `config` over `groups` on `device` (see [`optimizer`]).
pub fn lamb(
    groups: Vec<ParamGroup>,
    config: crate::optim::LambConfig,
    device: &Device,
) -> Result<Box<dyn TrainOptimizer>, OptimError> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return Ok(Box::new(crate::cuda::lamb::CudaLamb::new(groups, config)?));
    }
    let _ = device;
    Ok(Box::new(crate::optim::Lamb::new(groups, config)?))
}

/// The loader buffers and the upload for training on `device`: `num_buffers` buffers of
/// `buffer_bytes` (page-locked on CUDA, so the copies are asynchronous), and the matching
/// [`Upload`].
pub fn upload(
    device: &Device,
    feed: &Feed,
    num_buffers: usize,
    buffer_bytes: usize,
) -> candle_core::Result<(Vec<DynStorage>, Box<dyn Upload>)> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => {
            let buffers = crate::cuda::feed::pinned_buffers(dev, num_buffers, buffer_bytes)?
                .into_iter()
                .map(|b| Box::new(b) as DynStorage)
                .collect();
            let upload = crate::cuda::feed::CudaUpload::new(dev, buffer_bytes)?
                .with_normalization(feed.normalization());
            Ok((buffers, Box::new(upload)))
        }
        _ => {
            let buffers = (0..num_buffers)
                .map(|_| Box::new(vec![0u8; buffer_bytes]) as DynStorage)
                .collect();
            Ok((buffers, Box::new(HostUpload::new(feed.clone()))))
        }
    }
}

/// The collective of a GPU rank of a multi-process run: NCCL over the unique id rank 0 handed
/// out at the rendezvous (`token`), on `device` (this rank's GPU). A collective that does not
/// complete within `timeout` aborts the communicator (see `cuda::nccl`).
#[cfg(feature = "nccl")]
pub fn gpu_collective(
    device: &Device,
    info: &crate::dist::RankInfo,
    token: &[u8],
    timeout: std::time::Duration,
) -> crate::dist::Result<Box<dyn crate::dist::Collective>> {
    let Device::Cuda(dev) = device else {
        return Err(crate::dist::DistError::Unsupported(
            "NCCL needs a CUDA device".into(),
        ));
    };
    Ok(Box::new(crate::cuda::nccl::Nccl::new(
        dev,
        info.rank,
        info.world_size,
        token,
        timeout,
    )?))
}
