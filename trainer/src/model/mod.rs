//! Models: timm's ResNet family (`resnet.py`), RegNetY (`regnet.py`), EfficientNet-B0..B4
//! (`efficientnet.py`) and the Vision Transformers (`vision_transformer.py`), with PyTorch
//! BatchNorm/LayerNorm, stochastic depth and timm init; [`NetConfig::by_name`] takes any of
//! [`model_names`].
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
pub mod data_cfg;
pub mod drop_path;
pub mod params;
pub mod resnet;

pub use batch_norm::BatchNorm2d;
pub use data_cfg::{timm_data_cfg, TimmDataCfg};
pub use drop_path::{drop_path, drop_path_mask, drop_path_rates};
pub use params::{init_timm, is_running_stat, Param, ParamKind};
pub use resnet::{bicubic_matrix, resample_pos_embed};
pub use resnet::{
    ActivationLayout, Attention, BackwardMode, BlockKind, EfficientNetArch, EfficientNetBlock,
    EfficientNetConfig, EfficientNetStage, GradHook, RegNetConfig, RegNetStage, ResNet,
    ResNetConfig, StemKind, TrainPass, VitConfig,
};

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};

/// Every model name [`NetConfig::by_name`] accepts: [`ResNetConfig::NAMES`],
/// [`RegNetConfig::NAMES`], [`EfficientNetConfig::NAMES`], then [`VitConfig::NAMES`].
pub fn model_names() -> Vec<&'static str> {
    ResNetConfig::NAMES
        .iter()
        .chain(RegNetConfig::NAMES)
        .chain(EfficientNetConfig::NAMES)
        .chain(VitConfig::NAMES)
        .copied()
        .collect()
}

/// A network of any supported family, by timm name: each family has its own configuration
/// (timm's arguments), and all build the same network type, [`ResNet`].
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetConfig {
    /// timm `resnet.py` (ResNet, ResNet-D, SE-ResNet, ResNeXt, ECA-ResNet, SENet).
    ResNet(ResNetConfig),
    /// timm `regnet.py` (RegNetY).
    RegNet(RegNetConfig),
    /// timm `efficientnet.py` (EfficientNet-B0..B4).
    EfficientNet(EfficientNetConfig),
    /// timm `vision_transformer.py` (ViT-Ti/S/B).
    Vit(VitConfig),
}

impl From<VitConfig> for NetConfig {
    fn from(c: VitConfig) -> Self {
        NetConfig::Vit(c)
    }
}

impl From<EfficientNetConfig> for NetConfig {
    fn from(c: EfficientNetConfig) -> Self {
        NetConfig::EfficientNet(c)
    }
}

impl From<ResNetConfig> for NetConfig {
    fn from(c: ResNetConfig) -> Self {
        NetConfig::ResNet(c)
    }
}

impl From<RegNetConfig> for NetConfig {
    fn from(c: RegNetConfig) -> Self {
        NetConfig::RegNet(c)
    }
}

impl NetConfig {
    /// timm's architecture `name` with 1000 classes and no stochastic depth; an unknown name is
    /// an error listing [`model_names`].
    pub fn by_name(name: &str) -> Result<Self, ModelError> {
        if let Ok(c) = ResNetConfig::by_name(name) {
            return Ok(c.into());
        }
        if let Ok(c) = RegNetConfig::by_name(name) {
            return Ok(c.into());
        }
        if let Ok(c) = EfficientNetConfig::by_name(name) {
            return Ok(c.into());
        }
        if let Ok(c) = VitConfig::by_name(name) {
            return Ok(c.into());
        }
        Err(ModelError::UnknownModel {
            name: name.to_string(),
            known: model_names(),
        })
    }

    /// The same network with `num_classes` outputs.
    pub fn with_num_classes(mut self, num_classes: usize) -> Self {
        match &mut self {
            NetConfig::ResNet(c) => c.num_classes = num_classes,
            NetConfig::RegNet(c) => c.num_classes = num_classes,
            NetConfig::EfficientNet(c) => c.num_classes = num_classes,
            NetConfig::Vit(c) => c.num_classes = num_classes,
        }
        self
    }

    /// The same network with stochastic depth `rate` at the last block.
    pub fn with_drop_path_rate(mut self, rate: f64) -> Self {
        match &mut self {
            NetConfig::ResNet(c) => c.drop_path_rate = rate,
            NetConfig::RegNet(c) => c.drop_path_rate = rate,
            NetConfig::EfficientNet(c) => c.drop_path_rate = rate,
            NetConfig::Vit(c) => c.drop_path_rate = rate,
        }
        self
    }

    /// The same network laid out for `px` x `px` input: a Vision Transformer's position
    /// embedding gets that grid (the trainer builds at the recipe's training size); the
    /// convolutional networks take any size and are unchanged.
    pub fn with_img_size(mut self, px: usize) -> Self {
        if let NetConfig::Vit(c) = &mut self {
            c.img_size = px;
        }
        self
    }

    /// The input statistics of timm's `default_cfg` for this family, which timm's `train.py`
    /// and `validate.py` normalise with unless told otherwise: 0.5 for the Vision Transformers
    /// (`IMAGENET_INCEPTION_MEAN/STD`), ImageNet's for the rest.
    pub fn normalization(&self) -> crate::feed::Normalization {
        match self {
            NetConfig::Vit(_) => crate::feed::Normalization::INCEPTION,
            _ => crate::feed::Normalization::IMAGENET,
        }
    }

    /// Classifier outputs.
    pub fn num_classes(&self) -> usize {
        match self {
            NetConfig::ResNet(c) => c.num_classes,
            NetConfig::RegNet(c) => c.num_classes,
            NetConfig::EfficientNet(c) => c.num_classes,
            NetConfig::Vit(c) => c.num_classes,
        }
    }

    /// Builds the network from `vb` (tensors named as timm's `state_dict`).
    pub fn build(&self, vb: VarBuilder) -> candle_core::Result<ResNet> {
        match self {
            NetConfig::ResNet(c) => c.build(vb),
            NetConfig::RegNet(c) => c.build(vb),
            NetConfig::EfficientNet(c) => c.build(vb),
            NetConfig::Vit(c) => c.build(vb),
        }
    }

    /// A freshly initialised network (timm's init, a function of `seed`) whose tensors live
    /// in `varmap` under their timm names, in `dtype` on `device`.
    pub fn build_seeded(
        &self,
        varmap: &VarMap,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<ResNet> {
        let model = self.build(VarBuilder::from_varmap(varmap, dtype, device))?;
        model.init_timm(seed)?;
        Ok(model)
    }
}

/// Errors of model selection.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The requested architecture is not implemented.
    #[error("unknown model {name:?}; known models: {}", known.join(", "))]
    UnknownModel {
        /// The name asked for.
        name: String,
        /// Every name that is accepted.
        known: Vec<&'static str>,
    },
}
