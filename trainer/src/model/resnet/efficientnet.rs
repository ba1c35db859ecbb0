//! EfficientNet-B0..B4 of timm v0.5.4 (`efficientnet.py` `_gen_efficientnet`, built by
//! `efficientnet_builder.py`), from the same blocks as the ResNets: a conv-BN pair per conv, SiLU
//! between them, squeeze-excitation after the depthwise conv, a residual add (no activation)
//! where the block keeps its shape.
//!
//! Tensor names are timm's: `conv_stem`, `bn1`, `blocks.S.I.conv_dw`, `.bn1`, `.se.conv_reduce`,
//! `.se.conv_expand`, `.conv_pw`, `.bn2` (depthwise-separable blocks) or `.conv_pw`, `.bn1`,
//! `.conv_dw`, `.bn2`, `.se.*`, `.conv_pwl`, `.bn3` (inverted residuals), `conv_head`, `bn2`,
//! `classifier`.

use candle_core::{bail, DType, Device, Result};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use super::{BackwardMode, Block, BlockAttn, Builder, NetConfig, ResNet, SqueezeExcite, Stem};
use crate::model::params::ParamKind;
use crate::model::{ActivationLayout, ModelError};

/// An EfficientNet: the B0 architecture scaled by a channel and a depth multiplier.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EfficientNetConfig {
    /// Channel multiplier (B0 1.0 .. B4 1.4).
    pub channel_multiplier: f64,
    /// Depth multiplier (B0 1.0 .. B4 1.8).
    pub depth_multiplier: f64,
    /// Classifier outputs.
    pub num_classes: usize,
    /// Input channels.
    pub in_chans: usize,
    /// Stochastic depth: block `i` of `n` drops with `rate * i / n` (timm's EfficientNet rule).
    pub drop_path_rate: f64,
}

/// One stage of the architecture (timm's block strings `ds_r1_k3_s1_e1_c16_se0.25`, ...).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EfficientNetStage {
    /// Depthwise-separable (`ds`) rather than inverted residual (`ir`).
    pub depthwise_separable: bool,
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
}

/// EfficientNet-B0's `arch_def`, with SE ratio 0.25 throughout.
const B0: [EfficientNetStage; 7] = {
    const fn st(ds: bool, r: usize, k: usize, s: usize, e: usize, c: usize) -> EfficientNetStage {
        EfficientNetStage {
            depthwise_separable: ds,
            repeats: r,
            kernel: k,
            stride: s,
            expansion: e,
            channels: c,
        }
    }
    [
        st(true, 1, 3, 1, 1, 16),
        st(false, 2, 3, 2, 6, 24),
        st(false, 2, 5, 2, 6, 40),
        st(false, 3, 3, 2, 6, 80),
        st(false, 3, 5, 1, 6, 112),
        st(false, 4, 5, 2, 6, 192),
        st(false, 1, 3, 1, 6, 320),
    ]
};
const SE_RATIO: f64 = 0.25;

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
    /// The names [`EfficientNetConfig::by_name`] accepts (Table 3's B0 to B4).
    pub const NAMES: &'static [&'static str] = &[
        "efficientnet_b0",
        "efficientnet_b1",
        "efficientnet_b2",
        "efficientnet_b3",
        "efficientnet_b4",
    ];

    /// timm v0.5.4's `efficientnet_bN`: 1000 classes, no stochastic depth.
    pub fn by_name(name: &str) -> std::result::Result<Self, ModelError> {
        let (channel_multiplier, depth_multiplier) = match name {
            "efficientnet_b0" => (1.0, 1.0),
            "efficientnet_b1" => (1.0, 1.1),
            "efficientnet_b2" => (1.1, 1.2),
            "efficientnet_b3" => (1.2, 1.4),
            "efficientnet_b4" => (1.4, 1.8),
            _ => {
                return Err(ModelError::UnknownModel {
                    name: name.to_string(),
                    known: Self::NAMES.to_vec(),
                })
            }
        };
        Ok(Self {
            channel_multiplier,
            depth_multiplier,
            num_classes: 1000,
            in_chans: 3,
            drop_path_rate: 0.0,
        })
    }

    /// timm `round_channels`.
    fn channels(&self, c: usize) -> usize {
        make_divisible(c as f64 * self.channel_multiplier)
    }

    /// The same network with `num_classes` outputs.
    pub fn with_num_classes(mut self, num_classes: usize) -> Self {
        self.num_classes = num_classes;
        self
    }

    /// The same network with stochastic depth `rate`.
    pub fn with_drop_path_rate(mut self, rate: f64) -> Self {
        self.drop_path_rate = rate;
        self
    }

    /// Builds the network from `vb`, whose tensors are named as timm's `state_dict`.
    pub fn build(&self, vb: VarBuilder) -> Result<ResNet> {
        ResNet::new_efficientnet(self, vb)
    }

    /// A freshly initialised network in `varmap`: see [`NetConfig::build_seeded`].
    pub fn build_seeded(
        &self,
        varmap: &VarMap,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<ResNet> {
        NetConfig::EfficientNet(self.clone()).build_seeded(varmap, seed, dtype, device)
    }
}

impl ResNet {
    fn new_efficientnet(cfg: &EfficientNetConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.num_classes == 0 || cfg.in_chans == 0 {
            bail!("efficientnet: num_classes and in_chans must be positive, got {cfg:?}")
        }
        if !(0.0..1.0).contains(&cfg.drop_path_rate) {
            bail!(
                "efficientnet: drop_path_rate must be in [0, 1), got {}",
                cfg.drop_path_rate
            )
        }
        let mut b = Builder {
            params: Vec::new(),
            goog_init: true,
        };
        let stem_chs = cfg.channels(32);
        let stem = b.conv(&vb.pp("conv_stem"), cfg.in_chans, stem_chs, 3, 2, 1, false)?;
        let bn1 = b.bn(&vb.pp("bn1"), stem_chs, false)?;
        // timm `_scale_stage_depth` with one block string per stage: ceil(repeats * multiplier).
        let depths: Vec<usize> = B0
            .iter()
            .map(|s| (s.repeats as f64 * cfg.depth_multiplier).ceil() as usize)
            .collect();
        let total: usize = depths.iter().sum();
        let mut blocks = Vec::with_capacity(total);
        let mut c_in = stem_chs;
        for (si, (stage, &depth)) in B0.iter().zip(&depths).enumerate() {
            let c_out = cfg.channels(stage.channels);
            for i in 0..depth {
                let vs = vb.pp("blocks").pp(si).pp(i);
                let stride = if i == 0 { stage.stride } else { 1 };
                let k = stage.kernel;
                let index = blocks.len();
                let (branch, se, attn_after) = if stage.depthwise_separable {
                    let dw = (
                        b.conv(&vs.pp("conv_dw"), c_in, c_in, k, stride, c_in, false)?,
                        b.bn(&vs.pp("bn1"), c_in, false)?,
                    );
                    // SE on the block input, rd = round(in * 0.25).
                    let rd = (c_in as f64 * SE_RATIO).round_ties_even() as usize;
                    let se = se_module(&mut b, &vs.pp("se"), c_in, rd)?;
                    let pw = (
                        b.conv(&vs.pp("conv_pw"), c_in, c_out, 1, 1, 1, false)?,
                        b.bn(&vs.pp("bn2"), c_out, false)?,
                    );
                    (vec![dw, pw], se, 0)
                } else {
                    let mid = make_divisible(c_in as f64 * stage.expansion as f64);
                    let pw = (
                        b.conv(&vs.pp("conv_pw"), c_in, mid, 1, 1, 1, false)?,
                        b.bn(&vs.pp("bn1"), mid, false)?,
                    );
                    let dw = (
                        b.conv(&vs.pp("conv_dw"), mid, mid, k, stride, mid, false)?,
                        b.bn(&vs.pp("bn2"), mid, false)?,
                    );
                    // timm's builder divides the SE ratio by the expansion (SE channels from
                    // the block input): rd = round(mid * 0.25 / e).
                    let ratio = SE_RATIO / stage.expansion as f64;
                    let rd = (mid as f64 * ratio).round_ties_even() as usize;
                    let se = se_module(&mut b, &vs.pp("se"), mid, rd)?;
                    let pwl = (
                        b.conv(&vs.pp("conv_pwl"), mid, c_out, 1, 1, 1, false)?,
                        b.bn(&vs.pp("bn3"), c_out, false)?,
                    );
                    (vec![pw, dw, pwl], se, 1)
                };
                blocks.push(Block {
                    branch,
                    se: Some(se),
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
        let num_features = cfg.channels(1280);
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
        Ok(ResNet {
            config: NetConfig::EfficientNet(cfg.clone()),
            stem: Stem::Single(stem),
            bn1,
            max_pool: false,
            silu: true,
            head: Some(head),
            blocks,
            fc: candle_nn::Linear::new(w, Some(bias)),
            params: b.params,
            drop_path_seed: std::sync::Mutex::new(None),
            layout: ActivationLayout::Nchw,
            backward: BackwardMode::Auto,
        })
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
        let cfg = EfficientNetConfig::by_name("efficientnet_b0")
            .unwrap()
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
