//! Models: the timm ResNet family with PyTorch BatchNorm, stochastic depth and timm init.
//!
//! ```no_run
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{ModuleT, VarMap};
//! use trainer::model::ResNetConfig;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let cfg = ResNetConfig::by_name("resnet50")?.with_drop_path_rate(0.05);
//! let varmap = VarMap::new();
//! let model = cfg.build_seeded(&varmap, 0, DType::F32, &Device::Cpu)?;
//! let params = model.trainable_vars()?; // no BatchNorm running statistics
//! let xs = Tensor::zeros((2, 3, 224, 224), DType::F32, &Device::Cpu)?;
//! let logits = model.forward_train(&xs, loader::rng::derive(0, &[/* epoch */ 0, /* step */ 0]))?;
//! # let _ = (params, logits); Ok(()) }
//! ```

pub mod batch_norm;
pub mod drop_path;
pub mod params;
pub mod resnet;

pub use batch_norm::BatchNorm2d;
pub use drop_path::{drop_path, drop_path_mask, drop_path_rates};
pub use params::{init_timm, is_running_stat, Param, ParamKind};
pub use resnet::{
    ActivationLayout, Attention, BackwardMode, BlockKind, GradHook, ResNet, ResNetConfig, StemKind,
    TrainPass,
};

/// Errors of model selection.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The requested architecture is not implemented.
    #[error("unknown model {name:?}; known models: {}", known.join(", "))]
    UnknownModel {
        /// The name asked for.
        name: String,
        /// Every name that is accepted.
        known: &'static [&'static str],
    },
}
