//! The ResNet family of timm v0.5.4 (torchvision v1.5 layout: the stride sits on the 3x3 conv).
//!
//! Tensor names equal timm `state_dict` keys, so a timm checkpoint exported to safetensors loads
//! with a `VarBuilder` as-is (`num_batches_tracked` entries are ignored).

use std::sync::Mutex;

use candle_core::{bail, DType, Device, Result, Tensor, Var};
use candle_nn::{init::Init, ModuleT, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use super::batch_norm::BatchNorm2d;
use super::drop_path::{drop_path, drop_path_rates};
use super::params::{init_timm, Param, ParamKind};
use super::{ModelError, NetConfig};
use crate::ops::{avg_pool2d_ceil, max_pool2d, nhwc, Activation};

mod efficientnet;
mod explicit;
mod regnet;
mod vit;
pub use efficientnet::{
    EfficientNetArch, EfficientNetBlock, EfficientNetConfig, EfficientNetStage,
};
pub use explicit::{BackwardMode, GradHook, TrainPass};
pub use regnet::{RegNetConfig, RegNetStage};
pub use vit::{bicubic_matrix, resample_pos_embed, VitConfig};

/// The residual block type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockKind {
    /// Two 3x3 convs, expansion 1 (ResNet-18/34).
    Basic,
    /// 1x1, 3x3 (strided, grouped), 1x1 convs, expansion 4 (ResNet-50 and deeper).
    Bottleneck,
}

impl BlockKind {
    /// Output channels per unit of `planes`.
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// The network input stem, in front of the max-pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StemKind {
    /// One 7x7 stride-2 conv to 64 channels (`conv1`).
    Conv7x7,
    /// ResNet-D "deep" stem: 3x3 convs `width`, `width`, `2 * width`, the first strided
    /// (`conv1.0`, `conv1.3`, `conv1.6` with BNs `conv1.1`, `conv1.4`).
    Deep {
        /// Channels of the first two convs (timm `stem_width`).
        width: usize,
    },
    /// timm's `deep_tiered` stem (the "T" models): as [`StemKind::Deep`] with the first conv at
    /// `3 * (width / 4)` channels: `24, 32, 64` for width 32.
    DeepTiered {
        /// timm `stem_width`.
        width: usize,
    },
}

impl StemKind {
    /// Output channels of the stem's three convs, or of its one conv.
    fn widths(self) -> Vec<usize> {
        match self {
            StemKind::Conv7x7 => vec![64],
            StemKind::Deep { width } => vec![width, width, 2 * width],
            StemKind::DeepTiered { width } => vec![3 * (width / 4), width, 2 * width],
        }
    }
}

/// The channel attention after the last BN of a residual branch (timm `attn_layer`, module `se`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attention {
    /// None.
    #[default]
    None,
    /// Squeeze-and-excitation (timm `SEModule`: `se.fc1`, `se.fc2`, 1x1 convs with bias).
    SqueezeExcite,
    /// Efficient channel attention (timm `EcaModule`: `se.conv`, a bias-free 1-D conv across
    /// channels whose odd kernel size grows with log2 of the channel count).
    Eca,
}

/// Everything that determines a ResNet's structure and its stochastic depth.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResNetConfig {
    /// Residual block type.
    pub block: BlockKind,
    /// Blocks per stage (`layer1` .. `layer4`).
    pub layers: [usize; 4],
    /// Classifier outputs (at least 1).
    pub num_classes: usize,
    /// Input channels.
    pub in_chans: usize,
    /// Groups of the 3x3 conv in a Bottleneck (ResNeXt); 1 otherwise.
    pub cardinality: usize,
    /// Channels per group at `planes = 64` (ResNeXt); 64 otherwise.
    pub base_width: usize,
    /// The stem.
    pub stem: StemKind,
    /// ResNet-D shortcut: 2x2 average pool, then a stride-1 1x1 conv (`downsample.1`, `.2`).
    pub avg_down: bool,
    /// Channel attention after the last BN of each block (`se.*`).
    pub attention: Attention,
    /// The first conv of each block has `width / block_reduce_first` output channels (timm
    /// `block_reduce_first`; 2 in SENet-154, 1 otherwise).
    pub block_reduce_first: usize,
    /// Kernel of the strided projection shortcut without average pooling (timm
    /// `down_kernel_size`; 3 in SENet-154, 1 otherwise). A stride-1 shortcut is always 1x1.
    pub down_kernel_size: usize,
    /// Stochastic depth of the last block; earlier blocks get a linear ramp from 0.
    pub drop_path_rate: f64,
    /// Zero-initialise the last BN gamma of every residual branch.
    pub zero_init_last: bool,
}

impl ResNetConfig {
    /// Every name [`ResNetConfig::by_name`] accepts (timm model names).
    pub const NAMES: &'static [&'static str] = &[
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
        "resnet50d",
        "seresnet50",
        "resnext50_32x4d",
        "ecaresnet50t",
        "ecaresnet269d",
        "senet154",
    ];

    fn plain(block: BlockKind, layers: [usize; 4]) -> Self {
        Self {
            block,
            layers,
            num_classes: 1000,
            in_chans: 3,
            cardinality: 1,
            base_width: 64,
            stem: StemKind::Conv7x7,
            avg_down: false,
            attention: Attention::None,
            block_reduce_first: 1,
            down_kernel_size: 1,
            drop_path_rate: 0.0,
            zero_init_last: true,
        }
    }

    /// The timm architecture `name` with 1000 classes and no stochastic depth.
    pub fn by_name(name: &str) -> std::result::Result<Self, ModelError> {
        use BlockKind::{Basic, Bottleneck};
        Ok(match name {
            "resnet18" => Self::plain(Basic, [2, 2, 2, 2]),
            "resnet34" => Self::plain(Basic, [3, 4, 6, 3]),
            "resnet50" => Self::plain(Bottleneck, [3, 4, 6, 3]),
            "resnet101" => Self::plain(Bottleneck, [3, 4, 23, 3]),
            "resnet152" => Self::plain(Bottleneck, [3, 8, 36, 3]),
            "resnet50d" => Self {
                stem: StemKind::Deep { width: 32 },
                avg_down: true,
                ..Self::plain(Bottleneck, [3, 4, 6, 3])
            },
            "seresnet50" => Self {
                attention: Attention::SqueezeExcite,
                ..Self::plain(Bottleneck, [3, 4, 6, 3])
            },
            "resnext50_32x4d" => Self {
                cardinality: 32,
                base_width: 4,
                ..Self::plain(Bottleneck, [3, 4, 6, 3])
            },
            // timm 0.5.4 resnet.py `ecaresnet50t`: stem_width 32, deep_tiered, avg_down, eca.
            "ecaresnet50t" => Self {
                stem: StemKind::DeepTiered { width: 32 },
                avg_down: true,
                attention: Attention::Eca,
                ..Self::plain(Bottleneck, [3, 4, 6, 3])
            },
            // `ecaresnet269d`: layers 3, 30, 48, 8, stem_width 32, deep, avg_down, eca.
            "ecaresnet269d" => Self {
                stem: StemKind::Deep { width: 32 },
                avg_down: true,
                attention: Attention::Eca,
                ..Self::plain(Bottleneck, [3, 30, 48, 8])
            },
            // `senet154`: layers 3, 8, 36, 3, cardinality 64, base_width 4, deep stem (stem_width
            // 64), down_kernel_size 3, block_reduce_first 2, se.
            "senet154" => Self {
                cardinality: 64,
                base_width: 4,
                stem: StemKind::Deep { width: 64 },
                down_kernel_size: 3,
                block_reduce_first: 2,
                attention: Attention::SqueezeExcite,
                ..Self::plain(Bottleneck, [3, 8, 36, 3])
            },
            _ => {
                return Err(ModelError::UnknownModel {
                    name: name.to_string(),
                    known: Self::NAMES.to_vec(),
                })
            }
        })
    }

    /// The same architecture with `num_classes` outputs.
    pub fn with_num_classes(mut self, num_classes: usize) -> Self {
        self.num_classes = num_classes;
        self
    }

    /// The same architecture with stochastic depth `rate` at the last block.
    pub fn with_drop_path_rate(mut self, rate: f64) -> Self {
        self.drop_path_rate = rate;
        self
    }

    /// Residual blocks in the whole network.
    pub fn num_blocks(&self) -> usize {
        self.layers.iter().sum()
    }

    /// Drop probability of each block, in forward order.
    pub fn block_drop_probs(&self) -> Vec<f64> {
        drop_path_rates(self.drop_path_rate, self.num_blocks())
    }

    /// Channels entering the classifier.
    pub fn num_features(&self) -> usize {
        512 * self.block.expansion()
    }

    /// Checks the combinations timm rejects and the ranges that make no sense.
    pub fn validate(&self) -> Result<()> {
        if self.block == BlockKind::Basic && (self.cardinality != 1 || self.base_width != 64) {
            bail!("resnet: BasicBlock only supports cardinality 1 and base_width 64, got {self:?}")
        }
        if self.num_classes == 0
            || self.in_chans == 0
            || self.cardinality == 0
            || self.block_reduce_first == 0
        {
            bail!(
                "resnet: num_classes, in_chans, cardinality and block_reduce_first must be \
                 positive, got {self:?}"
            )
        }
        if !matches!(self.down_kernel_size, 1 | 3) {
            bail!(
                "resnet: down_kernel_size must be 1 or 3, got {}",
                self.down_kernel_size
            )
        }
        if !(0.0..1.0).contains(&self.drop_path_rate) {
            bail!(
                "resnet: drop_path_rate must be in [0, 1), got {}",
                self.drop_path_rate
            )
        }
        Ok(())
    }

    /// Builds the network from `vb`, whose tensors are named as timm's `state_dict`.
    ///
    /// With a `VarMap`-backed builder, missing tensors are created with placeholders (zeros,
    /// BN gamma and running variance 1): call [`ResNet::init_timm`] or use
    /// [`ResNetConfig::build_seeded`] for a fresh model.
    pub fn build(&self, vb: VarBuilder) -> Result<ResNet> {
        ResNet::new(self, vb)
    }

    /// A freshly initialised network (timm init, a function of `seed`) in `varmap`: see
    /// [`NetConfig::build_seeded`].
    pub fn build_seeded(
        &self,
        varmap: &VarMap,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<ResNet> {
        NetConfig::ResNet(self.clone()).build_seeded(varmap, seed, dtype, device)
    }
}

/// The checks every family makes on the class count, input channels and stochastic depth.
fn check_head_and_depth(
    family: &str,
    num_classes: usize,
    in_chans: usize,
    drop_path_rate: f64,
) -> Result<()> {
    if num_classes == 0 || in_chans == 0 {
        bail!(
            "{family}: num_classes and in_chans must be positive, got {num_classes} and {in_chans}"
        )
    }
    if !(0.0..1.0).contains(&drop_path_rate) {
        bail!("{family}: drop_path_rate must be in [0, 1), got {drop_path_rate}")
    }
    Ok(())
}

/// Memory layout of the activations (and of the network input).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivationLayout {
    /// `[N, C, H, W]`, PyTorch's default; candle's own ops.
    #[default]
    Nchw,
    /// `[N, H, W, C]` (channels-last): the layer functions of [`crate::ops::nhwc`], which run
    /// cuDNN and fused kernels for bf16 activations on CUDA.
    Nhwc,
}

impl std::str::FromStr for ActivationLayout {
    type Err = String;

    /// `nchw` or `nhwc`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "nchw" => Ok(ActivationLayout::Nchw),
            "nhwc" => Ok(ActivationLayout::Nhwc),
            other => Err(format!("layout {other:?}: expected nhwc or nchw")),
        }
    }
}

/// Per-forward settings threaded through the blocks.
#[derive(Clone, Copy, Debug)]
struct Ctx {
    train: bool,
    drop_path_seed: Option<u64>,
    nhwc: bool,
    /// The network's activation is SiLU (EfficientNet), not ReLU.
    silu: bool,
}

/// Collects the named tensors of a network while it is built.
struct Builder {
    params: Vec<Param>,
    /// EfficientNet's init (`_init_weight_goog`): conv weights on `fan_out / groups`, conv
    /// biases 0. Otherwise timm's ResNet init.
    goog_init: bool,
}

impl Builder {
    fn get(
        &mut self,
        vb: &VarBuilder,
        shape: &[usize],
        name: &str,
        kind: ParamKind,
    ) -> Result<Tensor> {
        let hint = match kind {
            ParamKind::BnWeight { .. } | ParamKind::BnRunningVar | ParamKind::LnWeight => {
                Init::Const(1.0)
            }
            _ => Init::Const(0.0),
        };
        let tensor = vb.get_with_hints(shape, name, hint)?;
        let prefix = vb.prefix();
        let full = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        };
        self.params.push(Param {
            name: full,
            kind,
            tensor: tensor.clone(),
        });
        Ok(tensor)
    }

    #[allow(clippy::too_many_arguments)]
    fn conv(
        &mut self,
        vb: &VarBuilder,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        groups: usize,
        bias: bool,
    ) -> Result<Conv> {
        if !c_in.is_multiple_of(groups) || !c_out.is_multiple_of(groups) {
            bail!(
                "conv {}: channels {c_in} -> {c_out} not divisible by {groups} groups",
                vb.prefix()
            )
        }
        let (weight_kind, bias_kind) = if self.goog_init {
            (ParamKind::ConvWeightGrouped { groups }, ParamKind::ZeroBias)
        } else {
            let fan_in = c_in / groups * kernel * kernel;
            (ParamKind::ConvWeight, ParamKind::ConvBias { fan_in })
        };
        let weight = self.get(
            vb,
            &[c_out, c_in / groups, kernel, kernel],
            "weight",
            weight_kind,
        )?;
        let bias = if bias {
            Some(self.get(vb, &[c_out], "bias", bias_kind)?)
        } else {
            None
        };
        Ok(Conv {
            weight,
            bias,
            stride,
            padding: kernel / 2,
            groups,
        })
    }

    /// A bias-free `Conv1d(1, 1, kernel)` weight `[1, 1, kernel]` (ECA).
    fn conv1d(&mut self, vb: &VarBuilder, kernel: usize) -> Result<Tensor> {
        self.get(
            vb,
            &[1, 1, kernel],
            "weight",
            ParamKind::Conv1dWeight { fan_in: kernel },
        )
    }

    fn bn(&mut self, vb: &VarBuilder, c: usize, zero_init: bool) -> Result<BatchNorm2d> {
        let w = self.get(vb, &[c], "weight", ParamKind::BnWeight { zero_init })?;
        let b = self.get(vb, &[c], "bias", ParamKind::BnBias)?;
        let rm = self.get(vb, &[c], "running_mean", ParamKind::BnRunningMean)?;
        let rv = self.get(vb, &[c], "running_var", ParamKind::BnRunningVar)?;
        BatchNorm2d::new(w, b, &rm, &rv)
    }
}

/// A 2-D convolution with "same"-style padding `kernel / 2`.
#[derive(Clone, Debug)]
struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
    groups: usize,
}

impl Conv {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = xs.conv2d(&self.weight, self.padding, self.stride, 1, self.groups)?;
        match &self.bias {
            Some(b) => ys.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
            None => Ok(ys),
        }
    }

    /// Channels-last forward; activations keep their dtype (the weight is cast per call).
    fn forward_nhwc(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = nhwc::conv2d(xs, &self.weight, self.stride, self.padding, self.groups)?;
        match &self.bias {
            Some(b) => ys.broadcast_add(&b.to_dtype(ys.dtype())?.reshape((1, 1, 1, b.dim(0)?))?),
            None => Ok(ys),
        }
    }

    fn forward_ctx(&self, xs: &Tensor, ctx: Ctx) -> Result<Tensor> {
        if ctx.nhwc {
            self.forward_nhwc(xs)
        } else {
            self.forward(xs)
        }
    }
}

/// BatchNorm then, with `act`, the network's activation (ReLU, or SiLU when `ctx.silu`) in the
/// layout of `ctx`.
fn bn_act(bn: &BatchNorm2d, xs: &Tensor, ctx: Ctx, act: bool) -> Result<Tensor> {
    if ctx.nhwc && !ctx.silu {
        return nhwc::batch_norm(xs, bn, ctx.train, act);
    }
    let ys = if ctx.nhwc {
        nhwc::batch_norm(xs, bn, ctx.train, false)?
    } else {
        bn.forward_t(xs, ctx.train)?
    };
    activate(&ys, ctx, act)
}

/// The network's activation when `act`, else `xs` itself.
fn activate(xs: &Tensor, ctx: Ctx, act: bool) -> Result<Tensor> {
    match (act, ctx.silu) {
        (false, _) => Ok(xs.clone()),
        (true, false) => xs.relu(),
        (true, true) => crate::ops::silu(xs),
    }
}

/// `conv`, then `bn` (+ the activation). The channels-last evaluation forward runs them as one
/// convolution with the BatchNorm and the activation folded in ([`nhwc::conv_bn_eval`]);
/// elsewhere the layers run one by one.
fn conv_bn(conv: &Conv, bn: &BatchNorm2d, xs: &Tensor, ctx: Ctx, act: bool) -> Result<Tensor> {
    if ctx.nhwc && !ctx.train && conv.bias.is_none() {
        let (stride, pad, groups) = (conv.stride, conv.padding, conv.groups);
        let act = match (act, ctx.silu) {
            (false, _) => Activation::Identity,
            (true, false) => Activation::Relu,
            (true, true) => Activation::Silu,
        };
        return nhwc::conv_bn_eval(xs, &conv.weight, stride, pad, groups, bn, act, None);
    }
    bn_act(bn, &conv.forward_ctx(xs, ctx)?, ctx, act)
}

/// timm `SEModule`: global mean, 1x1 conv down, ReLU, 1x1 conv up, sigmoid gate.
#[derive(Clone, Debug)]
struct SqueezeExcite {
    fc1: Conv,
    fc2: Conv,
}

impl SqueezeExcite {
    /// timm `make_divisible(channels / 16, 8, round_limit=0)`.
    fn reduced_channels(channels: usize) -> usize {
        let v = channels as f64 / 16.0;
        (((v + 4.0) as usize) / 8 * 8).max(8)
    }

    fn new(b: &mut Builder, vb: &VarBuilder, channels: usize) -> Result<Self> {
        Self::with_reduced(b, vb, channels, Self::reduced_channels(channels))
    }

    /// An SE module whose squeeze has `rd` channels (RegNet: a quarter of the block's input).
    fn with_reduced(b: &mut Builder, vb: &VarBuilder, channels: usize, rd: usize) -> Result<Self> {
        Ok(Self {
            fc1: b.conv(&vb.pp("fc1"), channels, rd, 1, 1, 1, true)?,
            fc2: b.conv(&vb.pp("fc2"), rd, channels, 1, 1, 1, true)?,
        })
    }

    /// The sigmoid gate from the squeezed input `s` (`[N, 1, 1, C]` channels-last, `[N, C, 1,
    /// 1]` NCHW, the activation's dtype).
    fn excite(&self, s: &Tensor, ctx: Ctx) -> Result<Tensor> {
        let s = self.fc1.forward_ctx(s, ctx)?;
        let s = self.fc2.forward_ctx(&activate(&s, ctx, true)?, ctx)?;
        candle_nn::ops::sigmoid(&s)
    }

    /// NCHW: the gate from the spatial mean, then the product.
    fn forward_nchw(&self, xs: &Tensor, ctx: Ctx) -> Result<Tensor> {
        xs.broadcast_mul(&self.excite(&xs.mean_keepdim((2, 3))?, ctx)?)
    }

    /// Channels-last: the gate `[N, C]` (the activation's dtype) from the pooled input `[N, C]`.
    fn gate_nhwc(&self, pooled: &Tensor, dtype: DType, ctx: Ctx) -> Result<Tensor> {
        let (n, c) = pooled.dims2()?;
        let s = pooled.to_dtype(dtype)?.reshape((n, 1, 1, c))?;
        self.excite(&s, ctx)?.reshape((n, c))
    }
}

/// timm `EcaModule`: global mean, a 1-D conv across the channels (zero padded, no bias),
/// sigmoid gate.
#[derive(Clone, Debug)]
struct Eca {
    /// `[1, 1, k]`.
    weight: Tensor,
}

impl Eca {
    /// timm: `t = int(abs(log2(channels) + 1) / 2)`, the next odd number from `t`, at least 3.
    fn kernel_size(channels: usize) -> usize {
        let t = (((channels as f64).ln() / 2f64.ln() + 1.0).abs() / 2.0) as usize;
        let k = if t % 2 == 1 { t } else { t + 1 };
        k.max(3)
    }

    fn new(b: &mut Builder, vb: &VarBuilder, channels: usize) -> Result<Self> {
        let weight = b.conv1d(&vb.pp("conv"), Self::kernel_size(channels))?;
        Ok(Self { weight })
    }

    /// The dtype of the mean, the 1-D conv and the sigmoid: f32 for half-precision activations,
    /// f64 for f64.
    fn stat_dtype(dtype: DType) -> DType {
        match dtype {
            DType::F64 => DType::F64,
            _ => DType::F32,
        }
    }

    /// The gate `[N, C]` in `dtype` from the pooled input `[N, C]` (see [`Eca::stat_dtype`]).
    fn gate(&self, pooled: &Tensor, dtype: DType) -> Result<Tensor> {
        let (n, c) = pooled.dims2()?;
        let dt = Self::stat_dtype(dtype);
        let k = self.weight.dim(2)?;
        let w = self.weight.to_dtype(dt)?;
        let y = pooled
            .to_dtype(dt)?
            .reshape((n, 1, c))?
            .conv1d(&w, (k - 1) / 2, 1, 1, 1)?;
        candle_nn::ops::sigmoid(&y)?
            .to_dtype(dtype)?
            .reshape((n, c))
    }

    /// NCHW: the gate from the spatial mean, then the product.
    fn forward_nchw(&self, xs: &Tensor) -> Result<Tensor> {
        let (n, c, _, _) = xs.dims4()?;
        let mean = xs.to_dtype(Self::stat_dtype(xs.dtype()))?.mean((2, 3))?;
        let gate = self.gate(&mean, xs.dtype())?;
        xs.broadcast_mul(&gate.reshape((n, c, 1, 1))?)
    }
}

/// A block's channel attention.
#[derive(Clone, Debug)]
enum BlockAttn {
    SqueezeExcite(SqueezeExcite),
    Eca(Eca),
}

impl BlockAttn {
    fn forward(&self, xs: &Tensor, ctx: Ctx) -> Result<Tensor> {
        if ctx.nhwc {
            // The mean in f32 (f64 for f64) whatever the activation dtype.
            let gate = self.gate_nhwc(&nhwc::global_avg_pool(xs)?, xs.dtype(), ctx)?;
            return nhwc::channel_scale(xs, &gate);
        }
        match self {
            BlockAttn::SqueezeExcite(se) => se.forward_nchw(xs, ctx),
            BlockAttn::Eca(eca) => eca.forward_nchw(xs),
        }
    }

    /// Channels-last: the gate `[N, C]` in `dtype` from the pooled activation `[N, C]`.
    fn gate_nhwc(&self, pooled: &Tensor, dtype: DType, ctx: Ctx) -> Result<Tensor> {
        match self {
            BlockAttn::SqueezeExcite(se) => se.gate_nhwc(pooled, dtype, ctx),
            BlockAttn::Eca(eca) => eca.gate(pooled, dtype),
        }
    }

    /// The module's tensors (weights and biases).
    fn tensors(&self) -> Vec<&Tensor> {
        match self {
            BlockAttn::SqueezeExcite(se) => [&se.fc1, &se.fc2]
                .into_iter()
                .flat_map(|c| std::iter::once(&c.weight).chain(c.bias.as_ref()))
                .collect(),
            BlockAttn::Eca(eca) => vec![&eca.weight],
        }
    }
}

/// The projection shortcut of a stage's first block.
#[derive(Clone, Debug)]
struct Downsample {
    /// ResNet-D: 2x2 ceil-mode average pool before a stride-1 conv.
    avg_pool: bool,
    conv: Conv,
    bn: BatchNorm2d,
}

impl Downsample {
    fn forward(&self, xs: &Tensor, ctx: Ctx) -> Result<Tensor> {
        let xs = match (self.avg_pool, ctx.nhwc) {
            (false, _) => xs.clone(),
            (true, false) => avg_pool2d_ceil(xs)?,
            (true, true) => nhwc::avg_pool2d_ceil(xs)?,
        };
        conv_bn(&self.conv, &self.bn, &xs, ctx, false)
    }
}

/// One residual block: conv-BN pairs with ReLU between them, optional SE, stochastic depth,
/// shortcut add, ReLU. Basic blocks have two pairs, Bottlenecks three.
#[derive(Clone, Debug)]
struct Block {
    branch: Vec<(Conv, BatchNorm2d)>,
    se: Option<BlockAttn>,
    /// The attention follows `branch[attn_after]` (the last pair in a ResNet, the grouped 3x3
    /// in a RegNet, the depthwise conv in an EfficientNet).
    attn_after: usize,
    /// The block adds its input (or the projection `downsample`) to the branch; EfficientNet's
    /// blocks that change shape do not.
    residual: bool,
    /// The activation after the add (ResNet, RegNet); none in EfficientNet.
    act_after_add: bool,
    downsample: Option<Downsample>,
    drop_prob: f64,
    index: usize,
}

impl Block {
    fn forward(&self, xs: &Tensor, ctx: Ctx) -> Result<Tensor> {
        let fused_eval = ctx.nhwc
            && !ctx.train
            && !ctx.silu
            && self.residual
            && self.act_after_add
            && self.se.is_none()
            && self.branch.iter().all(|(c, _)| c.bias.is_none());
        if let (true, Some(((last, last_bn), rest))) = (fused_eval, self.branch.split_last()) {
            // Evaluation: the shortcut first, so that the last conv adds it and applies the
            // ReLU as it writes its output.
            let shortcut = match &self.downsample {
                Some(d) => d.forward(xs, ctx)?,
                None => xs.clone(),
            };
            let mut ys = xs.clone();
            for (conv, bn) in rest {
                ys = conv_bn(conv, bn, &ys, ctx, true)?;
            }
            let (stride, pad, groups) = (last.stride, last.padding, last.groups);
            return nhwc::conv_bn_eval(
                &ys,
                &last.weight,
                stride,
                pad,
                groups,
                last_bn,
                Activation::Relu,
                Some(&shortcut),
            );
        }
        let mut ys = xs.clone();
        for (i, (conv, bn)) in self.branch.iter().enumerate() {
            let relu = i + 1 < self.branch.len();
            // conv_bn: in a channels-last evaluation the BatchNorm is folded into the conv.
            ys = conv_bn(conv, bn, &ys, ctx, relu)?;
            if let (Some(se), true) = (&self.se, i == self.attn_after) {
                ys = se.forward(&ys, ctx)?;
            }
        }
        if !self.residual {
            return Ok(ys);
        }
        if ctx.train && self.drop_prob > 0.0 {
            let Some(seed) = ctx.drop_path_seed else {
                bail!("resnet: a training forward with drop_path_rate > 0 needs a drop-path seed")
            };
            ys = drop_path(&ys, self.drop_prob, seed, self.index)?;
        }
        let shortcut = match &self.downsample {
            Some(d) => d.forward(xs, ctx)?,
            None => xs.clone(),
        };
        match (self.act_after_add, ctx.nhwc) {
            (true, true) if !ctx.silu => nhwc::add_relu(&ys, &shortcut),
            (act, _) => activate(&(ys + shortcut)?, ctx, act),
        }
    }
}

/// The input stem: conv(s) and BNs up to `bn1`; ReLU and the 3x3/2 max-pool follow.
#[derive(Clone, Debug)]
enum Stem {
    /// One conv (ResNet's 7x7/2, RegNet's 3x3/2).
    Single(Conv),
    /// The deep and tiered stems: two conv-BN-ReLU, then a conv.
    Deep([(Conv, BatchNorm2d); 2], Conv),
}

/// The network of every supported family (named after the first): timm's ResNets, RegNets and
/// EfficientNets (a convolutional trunk) and Vision Transformers, each followed by a linear
/// classifier. Build it with [`NetConfig::build`] or a family config's `build_seeded`.
#[derive(Debug)]
pub struct ResNet {
    config: NetConfig,
    trunk: Trunk,
    fc: candle_nn::Linear,
    params: Vec<Param>,
    drop_path_seed: Mutex<Option<u64>>,
    layout: ActivationLayout,
    backward: BackwardMode,
}

/// What turns the input into the classifier's features.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per network: the size difference costs nothing
enum Trunk {
    /// Convolutions, then global average pooling.
    Conv(ConvTrunk),
    /// Patch embedding and transformer blocks, then the class token.
    Vit(vit::VitTrunk),
}

/// The convolutional trunk of the ResNets, RegNets and EfficientNets.
#[derive(Debug)]
struct ConvTrunk {
    stem: Stem,
    bn1: BatchNorm2d,
    /// The 3x3/2 max-pool after the stem (ResNet; not RegNet, EfficientNet).
    max_pool: bool,
    /// SiLU activations (EfficientNet) instead of ReLU.
    silu: bool,
    /// A 1x1 conv-BN-activation after the blocks (EfficientNet's `conv_head`, `bn2`).
    head: Option<(Conv, BatchNorm2d)>,
    blocks: Vec<Block>,
}

impl ResNet {
    /// A network of `trunk` and the classifier `fc`, with its tensors `params` in timm's
    /// `state_dict` order: NCHW and the automatic backward until changed.
    fn assemble(
        config: NetConfig,
        trunk: Trunk,
        fc: candle_nn::Linear,
        params: Vec<Param>,
    ) -> Self {
        ResNet {
            config,
            trunk,
            fc,
            params,
            drop_path_seed: Mutex::new(None),
            layout: ActivationLayout::Nchw,
            backward: BackwardMode::Auto,
        }
    }

    fn new(cfg: &ResNetConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let mut b = Builder {
            params: Vec::new(),
            goog_init: false,
        };
        let (stem, inplanes) = match cfg.stem {
            StemKind::Conv7x7 => {
                let conv = b.conv(&vb.pp("conv1"), cfg.in_chans, 64, 7, 2, 1, false)?;
                (Stem::Single(conv), 64)
            }
            StemKind::Deep { .. } | StemKind::DeepTiered { .. } => {
                let w = cfg.stem.widths();
                let vs = vb.pp("conv1");
                let c0 = b.conv(&vs.pp("0"), cfg.in_chans, w[0], 3, 2, 1, false)?;
                let n1 = b.bn(&vs.pp("1"), w[0], false)?;
                let c3 = b.conv(&vs.pp("3"), w[0], w[1], 3, 1, 1, false)?;
                let n4 = b.bn(&vs.pp("4"), w[1], false)?;
                let c6 = b.conv(&vs.pp("6"), w[1], w[2], 3, 1, 1, false)?;
                (Stem::Deep([(c0, n1), (c3, n4)], c6), w[2])
            }
        };
        let bn1 = b.bn(&vb.pp("bn1"), inplanes, false)?;

        let drop_probs = cfg.block_drop_probs();
        let expansion = cfg.block.expansion();
        let mut blocks = Vec::with_capacity(cfg.num_blocks());
        let mut c_in = inplanes;
        for (stage, &num) in cfg.layers.iter().enumerate() {
            let planes = 64 << stage;
            let c_out = planes * expansion;
            let stage_stride = if stage == 0 { 1 } else { 2 };
            for i in 0..num {
                let vs = vb.pp(format!("layer{}", stage + 1)).pp(i);
                let stride = if i == 0 { stage_stride } else { 1 };
                let zi = cfg.zero_init_last;
                let mut branch = Vec::with_capacity(3);
                match cfg.block {
                    BlockKind::Basic => {
                        let first = planes / cfg.block_reduce_first;
                        branch.push((
                            b.conv(&vs.pp("conv1"), c_in, first, 3, stride, 1, false)?,
                            b.bn(&vs.pp("bn1"), first, false)?,
                        ));
                        branch.push((
                            b.conv(&vs.pp("conv2"), first, planes, 3, 1, 1, false)?,
                            b.bn(&vs.pp("bn2"), planes, zi)?,
                        ));
                    }
                    BlockKind::Bottleneck => {
                        let width = planes * cfg.base_width / 64 * cfg.cardinality;
                        let first = width / cfg.block_reduce_first;
                        branch.push((
                            b.conv(&vs.pp("conv1"), c_in, first, 1, 1, 1, false)?,
                            b.bn(&vs.pp("bn1"), first, false)?,
                        ));
                        branch.push((
                            b.conv(
                                &vs.pp("conv2"),
                                first,
                                width,
                                3,
                                stride,
                                cfg.cardinality,
                                false,
                            )?,
                            b.bn(&vs.pp("bn2"), width, false)?,
                        ));
                        branch.push((
                            b.conv(&vs.pp("conv3"), width, c_out, 1, 1, 1, false)?,
                            b.bn(&vs.pp("bn3"), c_out, zi)?,
                        ));
                    }
                }
                let se = match cfg.attention {
                    Attention::None => None,
                    Attention::SqueezeExcite => Some(BlockAttn::SqueezeExcite(SqueezeExcite::new(
                        &mut b,
                        &vs.pp("se"),
                        c_out,
                    )?)),
                    Attention::Eca => Some(BlockAttn::Eca(Eca::new(&mut b, &vs.pp("se"), c_out)?)),
                };
                let downsample = if i == 0 && (stride != 1 || c_in != c_out) {
                    let vd = vs.pp("downsample");
                    Some(if cfg.avg_down {
                        Downsample {
                            avg_pool: stride != 1,
                            conv: b.conv(&vd.pp("1"), c_in, c_out, 1, 1, 1, false)?,
                            bn: b.bn(&vd.pp("2"), c_out, false)?,
                        }
                    } else {
                        // timm `downsample_conv`: the kernel is 1 when the stride is 1.
                        let k = if stride == 1 { 1 } else { cfg.down_kernel_size };
                        Downsample {
                            avg_pool: false,
                            conv: b.conv(&vd.pp("0"), c_in, c_out, k, stride, 1, false)?,
                            bn: b.bn(&vd.pp("1"), c_out, false)?,
                        }
                    })
                } else {
                    None
                };
                let index = blocks.len();
                let attn_after = branch.len() - 1;
                blocks.push(Block {
                    branch,
                    se,
                    attn_after,
                    residual: true,
                    act_after_add: true,
                    downsample,
                    drop_prob: drop_probs[index],
                    index,
                });
                c_in = c_out;
            }
        }

        let vf = vb.pp("fc");
        let nf = cfg.num_features();
        let w = b.get(
            &vf,
            &[cfg.num_classes, nf],
            "weight",
            ParamKind::LinearWeight,
        )?;
        let bias = b.get(
            &vf,
            &[cfg.num_classes],
            "bias",
            ParamKind::LinearBias { fan_in: nf },
        )?;
        Ok(ResNet::assemble(
            NetConfig::ResNet(cfg.clone()),
            Trunk::Conv(ConvTrunk {
                stem,
                bn1,
                max_pool: true,
                silu: false,
                head: None,
                blocks,
            }),
            candle_nn::Linear::new(w, Some(bias)),
            b.params,
        ))
    }

    /// The activation layout the forward expects its input in (NCHW unless changed).
    pub fn layout(&self) -> ActivationLayout {
        self.layout
    }

    /// Switches the activation layout: with [`ActivationLayout::Nhwc`] the forward takes
    /// `[N, H, W, C]` input, and bf16 input on CUDA runs the fused channels-last ops (see
    /// [`crate::ops::nhwc`]). Parameters are unchanged (f32 masters in PyTorch layout), so the
    /// layout never shows in checkpoints.
    pub fn set_layout(&mut self, layout: ActivationLayout) {
        self.layout = layout;
    }

    /// The configuration this network was built from.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// Every tensor of the network, in timm `state_dict` order (without `num_batches_tracked`).
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// The tensors the optimizer updates, by timm name, in `state_dict` order: everything except
    /// the BatchNorm running statistics. Fails unless the network was built from a `VarMap`.
    pub fn trainable_vars(&self) -> Result<Vec<(String, Var)>> {
        self.params
            .iter()
            .filter(|p| p.kind.is_trainable())
            .map(|p| Ok((p.name.clone(), p.var()?)))
            .collect()
    }

    /// The BatchNorm running means and variances, by timm name. They change in every training
    /// forward and are checkpointed, but never optimised or weight-decayed.
    pub fn running_stats(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .filter(|p| !p.kind.is_trainable())
            .map(|p| (p.name.clone(), p.tensor.clone()))
            .collect()
    }

    /// Overwrites every tensor with timm's initialisation (see [`init_timm`]), a function of
    /// `seed` alone.
    pub fn init_timm(&self, seed: u64) -> Result<()> {
        init_timm(&self.params, seed)
    }

    /// Sets the seed of the drop-path masks for the next training [`ModuleT::forward_t`]; the
    /// forward consumes it, so each step must set a fresh one (derive it from
    /// `(seed, epoch, step)`). Not needed when `drop_path_rate` is 0.
    pub fn set_drop_path_seed(&self, seed: u64) {
        *self
            .drop_path_seed
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(seed);
    }

    /// Training forward: BatchNorm on batch statistics (running statistics updated) and
    /// stochastic depth with masks drawn from `drop_path_seed`.
    ///
    /// Known candle 0.11 limit: the conv2d backward derives one `output_padding` from the height
    /// and applies it to the width too, so `backward` fails with a shape mismatch when a strided
    /// conv sees a height and width of different parity (e.g. 32x48 input). Square crops (the
    /// RSB recipes) are unaffected; the forward is always fine.
    ///
    /// # Shapes
    /// - `xs`: `[N, in_chans, H, W]`, `N >= 2` (or `H, W` large enough that BN sees > 1 value)
    /// - returns logits `[N, num_classes]`
    pub fn forward_train(&self, xs: &Tensor, drop_path_seed: u64) -> Result<Tensor> {
        self.forward_ctx(
            xs,
            Ctx {
                train: true,
                drop_path_seed: Some(drop_path_seed),
                nhwc: self.layout == ActivationLayout::Nhwc,
                silu: self.silu(),
            },
        )
    }

    /// Evaluation forward: BatchNorm on running statistics, no stochastic depth.
    ///
    /// # Shapes
    /// - `xs`: `[N, in_chans, H, W]`
    /// - returns logits `[N, num_classes]`
    pub fn forward_eval(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_ctx(
            xs,
            Ctx {
                train: false,
                drop_path_seed: None,
                nhwc: self.layout == ActivationLayout::Nhwc,
                silu: self.silu(),
            },
        )
    }

    /// The SiLU activation (EfficientNet) instead of ReLU.
    fn silu(&self) -> bool {
        matches!(&self.trunk, Trunk::Conv(t) if t.silu)
    }

    /// The convolutional trunk; an error for a Vision Transformer.
    fn conv_trunk(&self) -> Result<&ConvTrunk> {
        match &self.trunk {
            Trunk::Conv(t) => Ok(t),
            Trunk::Vit(_) => bail!("a Vision Transformer has no convolutional trunk"),
        }
    }

    fn forward_ctx(&self, xs: &Tensor, ctx: Ctx) -> Result<Tensor> {
        let dtype = self.fc.weight().dtype();
        let features = match &self.trunk {
            Trunk::Conv(t) => t.features(xs, ctx, dtype)?,
            Trunk::Vit(t) => t.features(xs, ctx)?.to_dtype(dtype)?,
        };
        candle_nn::Module::forward(&self.fc, &features)
    }
}

impl ConvTrunk {
    /// The pooled features `[N, C]` (in `dtype` on the channels-last path).
    fn features(&self, xs: &Tensor, ctx: Ctx, dtype: DType) -> Result<Tensor> {
        let mut ys = match &self.stem {
            Stem::Single(conv) => conv_bn(conv, &self.bn1, xs, ctx, true)?,
            Stem::Deep(pairs, last) => {
                let mut ys = xs.clone();
                for (conv, bn) in pairs {
                    ys = conv_bn(conv, bn, &ys, ctx, true)?;
                }
                conv_bn(last, &self.bn1, &ys, ctx, true)?
            }
        };
        if self.max_pool {
            ys = if ctx.nhwc {
                nhwc::max_pool(&ys, 3, 2, 1)?
            } else {
                max_pool2d(&ys, 3, 2, 1)?
            };
        }
        for block in &self.blocks {
            ys = block.forward(&ys, ctx)?;
        }
        if let Some((conv, bn)) = &self.head {
            ys = conv_bn(conv, bn, &ys, ctx, true)?;
        }
        if ctx.nhwc {
            // f32 features: the classifier and the loss run in f32.
            nhwc::global_avg_pool(&ys)?.to_dtype(dtype)
        } else {
            ys.mean((2, 3))
        }
    }
}

impl ModuleT for ResNet {
    /// `train = false` is [`ResNet::forward_eval`]. `train = true` is [`ResNet::forward_train`]
    /// with the seed from [`ResNet::set_drop_path_seed`], which it consumes; without one, a
    /// network with stochastic depth returns an error rather than reusing a mask.
    ///
    /// # Shapes
    /// - `xs`: `[N, in_chans, H, W]`
    /// - returns logits `[N, num_classes]`
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        if !train {
            return self.forward_eval(xs);
        }
        let seed = self
            .drop_path_seed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        self.forward_ctx(
            xs,
            Ctx {
                train: true,
                drop_path_seed: seed,
                nhwc: self.layout == ActivationLayout::Nhwc,
                silu: self.silu(),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_name_lists_the_known_ones() {
        let err = ResNetConfig::by_name("resnet51").unwrap_err().to_string();
        assert!(
            err.contains("resnet51") && err.contains("resnext50_32x4d"),
            "{err}"
        );
    }

    #[test]
    fn se_reduction_matches_timm_make_divisible() {
        let got: Vec<usize> = [64, 256, 512, 1024, 2048]
            .iter()
            .map(|&c| SqueezeExcite::reduced_channels(c))
            .collect();
        assert_eq!(got, [8, 16, 32, 64, 128]);
    }

    /// timm's `EcaModule` kernel sizes (`int(abs(log2(c) + 1) / 2)`, made odd, at least 3):
    /// 3 up to 64 channels, 5 from 128 to 1024, 7 at 2048; and PyTorch's default `Conv1d` init
    /// bound `1/sqrt(k)` for the kernel, which timm's ResNet init leaves alone.
    #[test]
    fn eca_kernel_sizes_and_init_match_timm() -> Result<()> {
        let got: Vec<usize> = [16, 64, 128, 256, 512, 1024, 2048]
            .iter()
            .map(|&c| Eca::kernel_size(c))
            .collect();
        assert_eq!(got, [3, 3, 5, 5, 5, 5, 7]);
        let cfg = ResNetConfig::by_name("ecaresnet50t").unwrap();
        let model = cfg.build_seeded(&VarMap::new(), 3, DType::F32, &Device::Cpu)?;
        let eca: Vec<_> = model
            .params()
            .iter()
            .filter(|p| p.name.ends_with("se.conv.weight"))
            .collect();
        assert_eq!(eca.len(), 16);
        for p in eca {
            let k = p.tensor.dim(2)?;
            let v = p.tensor.flatten_all()?.to_vec1::<f32>()?;
            let bound = 1.0 / (k as f32).sqrt();
            assert!(v.iter().all(|x| x.abs() <= bound), "{}: {v:?}", p.name);
            assert!(v.iter().any(|&x| x != 0.0), "{}", p.name);
        }
        Ok(())
    }
}
