//! EfficientNet-B0..B4 and EfficientNetV2-rw-S/M of timm v0.5.4 (`efficientnet.py`
//! `_gen_efficientnet`, `_gen_efficientnetv2_s(rw=True)`, built by `efficientnet_builder.py`),
//! from the same blocks as the ResNets: a conv-BN pair per conv, SiLU between them,
//! squeeze-excitation after the depthwise conv, a residual add (no activation) where the block
//! keeps its shape. V2's early stages are edge residuals (Fused-MBConv: a full 3x3 expansion conv
//! `conv_exp`, `bn1`, then `conv_pwl`, `bn2`).
//!
//! Tensor names are timm's: `conv_stem`, `bn1`, `blocks.S.I.conv_dw`, `.bn1`, `.se.conv_reduce`,
//! `.se.conv_expand`, `.conv_pw`, `.bn2` (depthwise-separable blocks) or `.conv_pw`, `.bn1`,
//! `.conv_dw`, `.bn2`, `.se.*`, `.conv_pwl`, `.bn3` (inverted residuals), `conv_head`, `bn2`,
//! `classifier`.

use candle_core::{bail, Result};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::{Block, BlockAttn, Builder, ConvTrunk, NetConfig, ResNet, SqueezeExcite, Stem, Trunk};
use crate::model::params::ParamKind;
use crate::model::ModelError;

/// The base architecture an [`EfficientNetConfig`] scales.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EfficientNetArch {
    /// EfficientNet-B0's seven stages (stem 32, head 1280).
    B0,
    /// EfficientNetV2-S as timm's `rw` variant (stem 24, head 1792, last stage 272 channels).
    V2RwS,
}

/// An EfficientNet: a base architecture scaled by a channel and per-stage depth multipliers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EfficientNetConfig {
    /// The base architecture.
    pub arch: EfficientNetArch,
    /// Channel multiplier (B0 1.0 .. B4 1.4; V2-rw-M 1.2).
    pub channel_multiplier: f64,
    /// Depth multiplier of each stage (B0 1.0 .. B4 1.8 for all; V2-rw-M 1.2 then 1.6).
    pub depth_multipliers: Vec<f64>,
    /// Classifier outputs.
    pub num_classes: usize,
    /// Input channels.
    pub in_chans: usize,
    /// Stochastic depth: block `i` of `n` drops with `rate * i / n` (timm's EfficientNet rule).
    pub drop_path_rate: f64,
}

/// A block type of timm's block strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EfficientNetBlock {
    /// `ds`: depthwise conv, SE, pointwise conv.
    DepthwiseSeparable,
    /// `ir`: pointwise expansion, depthwise conv, SE, pointwise projection (MBConv).
    InvertedResidual,
    /// `er`: a full kxk expansion conv, SE, pointwise projection (Fused-MBConv).
    EdgeResidual,
}

/// One stage of the architecture (timm's block strings `ds_r1_k3_s1_e1_c16_se0.25`, ...).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EfficientNetStage {
    /// The block type.
    pub block: EfficientNetBlock,
    /// Blocks before depth scaling.
    pub repeats: usize,
    /// Depthwise kernel.
    pub kernel: usize,
    /// Stride of the first block.
    pub stride: usize,
    /// Expansion of the inverted residual.
    pub expansion: usize,
    /// Output channels before channel scaling.
    pub channels: usize,
    /// Squeeze-excitation ratio (0 = none).
    pub se: f64,
}

const fn st(
    block: EfficientNetBlock,
    r: usize,
    k: usize,
    s: usize,
    e: usize,
    c: usize,
    se: f64,
) -> EfficientNetStage {
    EfficientNetStage {
        block,
        repeats: r,
        kernel: k,
        stride: s,
        expansion: e,
        channels: c,
        se,
    }
}
use EfficientNetBlock::{DepthwiseSeparable as Ds, EdgeResidual as Er, InvertedResidual as Ir};

/// EfficientNet-B0's `arch_def` (`_gen_efficientnet`).
const B0: [EfficientNetStage; 7] = [
    st(Ds, 1, 3, 1, 1, 16, 0.25),
    st(Ir, 2, 3, 2, 6, 24, 0.25),
    st(Ir, 2, 5, 2, 6, 40, 0.25),
    st(Ir, 3, 3, 2, 6, 80, 0.25),
    st(Ir, 3, 5, 1, 6, 112, 0.25),
    st(Ir, 4, 5, 2, 6, 192, 0.25),
    st(Ir, 1, 3, 1, 6, 320, 0.25),
];

/// EfficientNetV2-S's `arch_def` with timm's `rw` changes (`_gen_efficientnetv2_s(rw=True)`).
const V2_RW_S: [EfficientNetStage; 6] = [
    st(Er, 2, 3, 1, 1, 24, 0.0),
    st(Er, 4, 3, 2, 4, 48, 0.0),
    st(Er, 4, 3, 2, 4, 64, 0.0),
    st(Ir, 6, 3, 2, 4, 128, 0.25),
    st(Ir, 9, 3, 1, 6, 160, 0.25),
    st(Ir, 15, 3, 2, 6, 272, 0.25),
];

impl EfficientNetArch {
    /// The stages, stem width and head width before scaling.
    fn layout(self) -> (&'static [EfficientNetStage], usize, usize) {
        match self {
            EfficientNetArch::B0 => (&B0, 32, 1280),
            EfficientNetArch::V2RwS => (&V2_RW_S, 24, 1792),
        }
    }
}

/// timm `make_divisible(v, 8)`: the nearest multiple of 8 (at least 8), one step up when that
/// loses more than 10 %.
fn make_divisible(v: f64) -> usize {
    let d = 8usize;
    let mut n = (((v + d as f64 / 2.0) as usize) / d * d).max(d);
    if (n as f64) < 0.9 * v {
        n += d;
    }
    n
}

impl EfficientNetConfig {
    /// The names [`EfficientNetConfig::by_name`] accepts (Table 3's B0 to B4 and V2-rw-S/M).
    pub const NAMES: &'static [&'static str] = &[
        "efficientnet_b0",
        "efficientnet_b1",
        "efficientnet_b2",
        "efficientnet_b3",
        "efficientnet_b4",
        "efficientnetv2_rw_s",
        "efficientnetv2_rw_m",
    ];

    /// timm v0.5.4's `efficientnet_bN` and `efficientnetv2_rw_{s,m}`: 1000 classes, no
    /// stochastic depth.
    pub fn by_name(name: &str) -> std::result::Result<Self, ModelError> {
        use EfficientNetArch::{V2RwS, B0 as V1};
        let all = |m: f64, n: usize| vec![m; n];
        let (arch, channel_multiplier, depth_multipliers) = match name {
            "efficientnet_b0" => (V1, 1.0, all(1.0, 7)),
            "efficientnet_b1" => (V1, 1.0, all(1.1, 7)),
            "efficientnet_b2" => (V1, 1.1, all(1.2, 7)),
            "efficientnet_b3" => (V1, 1.2, all(1.4, 7)),
            "efficientnet_b4" => (V1, 1.4, all(1.8, 7)),
            "efficientnetv2_rw_s" => (V2RwS, 1.0, all(1.0, 6)),
            // timm: depth_multiplier=(1.2,) * 4 + (1.6,) * 2.
            "efficientnetv2_rw_m" => (V2RwS, 1.2, vec![1.2, 1.2, 1.2, 1.2, 1.6, 1.6]),
            _ => {
                return Err(ModelError::UnknownModel {
                    name: name.to_string(),
                    known: Self::NAMES.to_vec(),
                })
            }
        };
        Ok(Self {
            arch,
            channel_multiplier,
            depth_multipliers,
            num_classes: 1000,
            in_chans: 3,
            drop_path_rate: 0.0,
        })
    }

    /// timm `round_channels`.
    fn channels(&self, c: usize) -> usize {
        make_divisible(c as f64 * self.channel_multiplier)
    }

    /// Builds the network from `vb`, whose tensors are named as timm's `state_dict`.
    pub fn build(&self, vb: VarBuilder) -> Result<ResNet> {
        ResNet::new_efficientnet(self, vb)
    }
}

impl ResNet {
    fn new_efficientnet(cfg: &EfficientNetConfig, vb: VarBuilder) -> Result<Self> {
        super::check_head_and_depth(
            "efficientnet",
            cfg.num_classes,
            cfg.in_chans,
            cfg.drop_path_rate,
        )?;
        let mut b = Builder {
            params: Vec::new(),
            goog_init: true,
        };
        let (stages, stem_width, head_width) = cfg.arch.layout();
        if cfg.depth_multipliers.len() != stages.len() {
            bail!(
                "efficientnet: {} depth multipliers for {} stages",
                cfg.depth_multipliers.len(),
                stages.len()
            )
        }
        let stem_chs = cfg.channels(stem_width);
        let stem = b.conv(&vb.pp("conv_stem"), cfg.in_chans, stem_chs, 3, 2, 1, false)?;
        let bn1 = b.bn(&vb.pp("bn1"), stem_chs, false)?;
        // timm `_scale_stage_depth` with one block string per stage: ceil(repeats * multiplier).
        let depths: Vec<usize> = stages
            .iter()
            .zip(&cfg.depth_multipliers)
            .map(|(s, m)| (s.repeats as f64 * m).ceil() as usize)
            .collect();
        let total: usize = depths.iter().sum();
        let mut blocks = Vec::with_capacity(total);
        let mut c_in = stem_chs;
        for (si, (stage, &depth)) in stages.iter().zip(&depths).enumerate() {
            let c_out = cfg.channels(stage.channels);
            for i in 0..depth {
                let vs = vb.pp("blocks").pp(si).pp(i);
                let stride = if i == 0 { stage.stride } else { 1 };
                let k = stage.kernel;
                let index = blocks.len();
                // timm's builder divides the SE ratio by the expansion (SE channels from the
                // block input): rd = round(channels * se / e) on the SE's input channels.
                let se_of = |b: &mut Builder, channels: usize| -> Result<Option<BlockAttn>> {
                    if stage.se == 0.0 {
                        return Ok(None);
                    }
                    let ratio = stage.se / stage.expansion as f64;
                    let rd = (channels as f64 * ratio).round_ties_even() as usize;
                    se_module(b, &vs.pp("se"), channels, rd).map(Some)
                };
                let (branch, se, attn_after) = match stage.block {
                    Ds => {
                        let dw = (
                            b.conv(&vs.pp("conv_dw"), c_in, c_in, k, stride, c_in, false)?,
                            b.bn(&vs.pp("bn1"), c_in, false)?,
                        );
                        let se = se_of(&mut b, c_in)?;
                        let pw = (
                            b.conv(&vs.pp("conv_pw"), c_in, c_out, 1, 1, 1, false)?,
                            b.bn(&vs.pp("bn2"), c_out, false)?,
                        );
                        (vec![dw, pw], se, 0)
                    }
                    Ir => {
                        let mid = make_divisible(c_in as f64 * stage.expansion as f64);
                        let pw = (
                            b.conv(&vs.pp("conv_pw"), c_in, mid, 1, 1, 1, false)?,
                            b.bn(&vs.pp("bn1"), mid, false)?,
                        );
                        let dw = (
                            b.conv(&vs.pp("conv_dw"), mid, mid, k, stride, mid, false)?,
                            b.bn(&vs.pp("bn2"), mid, false)?,
                        );
                        let se = se_of(&mut b, mid)?;
                        let pwl = (
                            b.conv(&vs.pp("conv_pwl"), mid, c_out, 1, 1, 1, false)?,
                            b.bn(&vs.pp("bn3"), c_out, false)?,
                        );
                        (vec![pw, dw, pwl], se, 1)
                    }
                    Er => {
                        let mid = make_divisible(c_in as f64 * stage.expansion as f64);
                        let exp = (
                            b.conv(&vs.pp("conv_exp"), c_in, mid, k, stride, 1, false)?,
                            b.bn(&vs.pp("bn1"), mid, false)?,
                        );
                        let se = se_of(&mut b, mid)?;
                        let pwl = (
                            b.conv(&vs.pp("conv_pwl"), mid, c_out, 1, 1, 1, false)?,
                            b.bn(&vs.pp("bn2"), c_out, false)?,
                        );
                        (vec![exp, pwl], se, 0)
                    }
                };
                blocks.push(Block {
                    branch,
                    se,
                    attn_after,
                    residual: stride == 1 && c_in == c_out,
                    act_after_add: false,
                    downsample: None,
                    drop_prob: cfg.drop_path_rate * index as f64 / total as f64,
                    index,
                });
                c_in = c_out;
            }
        }
        let num_features = cfg.channels(head_width);
        let head = (
            b.conv(&vb.pp("conv_head"), c_in, num_features, 1, 1, 1, false)?,
            b.bn(&vb.pp("bn2"), num_features, false)?,
        );
        let vf = vb.pp("classifier");
        let w = b.get(
            &vf,
            &[cfg.num_classes, num_features],
            "weight",
            ParamKind::LinearWeightFanOut,
        )?;
        let bias = b.get(&vf, &[cfg.num_classes], "bias", ParamKind::ZeroBias)?;
        Ok(ResNet::assemble(
            NetConfig::EfficientNet(cfg.clone()),
            Trunk::Conv(ConvTrunk {
                stem: Stem::Single(stem),
                bn1,
                max_pool: false,
                silu: true,
                head: Some(head),
                blocks,
            }),
            candle_nn::Linear::new(w, Some(bias)),
            b.params,
        ))
    }
}

/// timm `efficientnet_blocks.SqueezeExcite` (`conv_reduce`, the block's SiLU, `conv_expand`,
/// sigmoid): the ResNet SE module under EfficientNet's names.
fn se_module(b: &mut Builder, vb: &VarBuilder, channels: usize, rd: usize) -> Result<BlockAttn> {
    Ok(BlockAttn::SqueezeExcite(SqueezeExcite {
        fc1: b.conv(&vb.pp("conv_reduce"), channels, rd, 1, 1, 1, true)?,
        fc2: b.conv(&vb.pp("conv_expand"), rd, channels, 1, 1, 1, true)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn make_divisible_matches_timm() {
        // timm: make_divisible(32 * 1.4) = 48, (1280 * 1.4) = 1792, (16 * 1.1) = 16,
        // (24 * 1.2) = 32, (40 * 1.1) = 48.
        let got: Vec<usize> = [32.0 * 1.4, 1280.0 * 1.4, 16.0 * 1.1, 24.0 * 1.2, 40.0 * 1.1]
            .iter()
            .map(|&v| make_divisible(v))
            .collect();
        assert_eq!(got, [48, 1792, 16, 32, 48]);
    }

    /// timm's `_init_weight_goog`: depthwise kernels `N(0, 2 / (k * k * O / groups))`, SE conv
    /// biases 0, classifier `U(±1/sqrt(out))` with bias 0, BN gamma 1 (no zero-init).
    #[test]
    fn init_follows_timm() -> Result<()> {
        let cfg = NetConfig::from(EfficientNetConfig::by_name("efficientnet_b0").unwrap())
            .with_num_classes(10);
        let model = cfg.build_seeded(&VarMap::new(), 5, DType::F32, &Device::Cpu)?;
        let get = |name: &str| {
            let p = model.params().iter().find(|p| p.name == name).unwrap();
            p.tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let std = |v: &[f32]| {
            let n = v.len() as f64;
            (v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / n).sqrt()
        };
        // blocks.5.0.conv_dw: [672, 1, 5, 5], depthwise (mid = 112 * 6).
        let dw = get("blocks.5.0.conv_dw.weight");
        let want = (2.0f64 / 25.0).sqrt();
        let tol = 5.0 / (2.0 * dw.len() as f64).sqrt();
        assert!(
            (std(&dw) / want - 1.0).abs() < tol,
            "{} vs {want}",
            std(&dw)
        );
        assert!(get("blocks.5.0.se.conv_reduce.bias")
            .iter()
            .all(|&x| x == 0.0));
        let w = get("classifier.weight");
        let bound = 1.0 / 10f32.sqrt();
        assert!(w.iter().all(|x| x.abs() <= bound) && std(&w) > 0.1);
        assert!(get("classifier.bias").iter().all(|&x| x == 0.0));
        assert!(get("blocks.1.0.bn3.weight").iter().all(|&x| x == 1.0));
        assert!(model.explicit_backward_unsupported().is_some());
        Ok(())
    }
}
