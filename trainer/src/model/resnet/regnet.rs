//! The RegNet family of timm v0.5.4 (`timm/models/regnet.py`): RegNetY, the Table 3 networks
//! of the RSB paper, built from the same blocks as the ResNets.
//!
//! A RegNet is a residual network of bottleneck blocks whose widths come from a quantised linear
//! rule (`generate_regnet`: `w0`, `wa`, `wm`, `depth`), with grouped 3x3 convs of a fixed group
//! width, squeeze-excitation after the 3x3 (RegNetY), a single 3x3/2 stem and no max-pool.
//! Tensor names are timm's: `stem.conv`, `stem.bn`, `s1.b1.conv1.conv`, `s1.b1.conv1.bn`, ...,
//! `s1.b1.se.fc1`, `s1.b1.downsample.conv`, `head.fc`.

use candle_core::{bail, Result};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::{
    Block, BlockAttn, Builder, ConvTrunk, Downsample, NetConfig, ResNet, SqueezeExcite, Stem, Trunk,
};
use crate::model::drop_path::drop_path_rates;
use crate::model::params::ParamKind;
use crate::model::ModelError;

/// A RegNet's generating parameters (timm `model_cfgs`), with the class count and stochastic
/// depth.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegNetConfig {
    /// Initial width `w0`.
    pub w0: usize,
    /// Width slope `wa`.
    pub wa: f64,
    /// Width multiplier `wm` (the quantisation step between stages).
    pub wm: f64,
    /// Blocks in all.
    pub depth: usize,
    /// Channels per group of the 3x3 convs.
    pub group_w: usize,
    /// Squeeze-excitation width as a fraction of the block's input channels (0.25 in RegNetY,
    /// 0 = none).
    pub se_ratio: f64,
    /// Bottleneck width as a fraction of the block's output (1 in every timm RegNet).
    pub bottle_ratio: f64,
    /// Channels of the stem conv.
    pub stem_width: usize,
    /// Classifier outputs.
    pub num_classes: usize,
    /// Input channels.
    pub in_chans: usize,
    /// Stochastic depth of the last block; a linear ramp from 0 before it.
    pub drop_path_rate: f64,
    /// Zero-initialise the BN gamma of each block's last conv (timm `zero_init_last_bn`).
    pub zero_init_last: bool,
}

/// One stage as `_get_stage_params` gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegNetStage {
    /// Output channels of every block of the stage.
    pub width: usize,
    /// Blocks in the stage.
    pub depth: usize,
    /// Channels per group of its 3x3 convs (after `adjust_widths_groups_comp`).
    pub group_width: usize,
    /// Stride of its first block.
    pub stride: usize,
}

/// Python's `round` (and numpy's `np.round`): halves to even.
fn round_even(x: f64) -> f64 {
    x.round_ties_even()
}

impl RegNetConfig {
    /// The names [`RegNetConfig::by_name`] accepts: RegNetY-4/8/16/32GF of the paper's Table 3,
    /// and the small RegNetY-200MF (tests and quick runs).
    pub const NAMES: &'static [&'static str] = &[
        "regnety_002",
        "regnety_040",
        "regnety_080",
        "regnety_160",
        "regnety_320",
    ];

    fn y(w0: usize, wa: f64, wm: f64, group_w: usize, depth: usize) -> Self {
        RegNetConfig {
            w0,
            wa,
            wm,
            depth,
            group_w,
            se_ratio: 0.25,
            bottle_ratio: 1.0,
            stem_width: 32,
            num_classes: 1000,
            in_chans: 3,
            drop_path_rate: 0.0,
            zero_init_last: true,
        }
    }

    /// timm v0.5.4's `model_cfgs[name]` with 1000 classes and no stochastic depth.
    pub fn by_name(name: &str) -> std::result::Result<Self, ModelError> {
        Ok(match name {
            "regnety_002" => Self::y(24, 36.44, 2.49, 8, 13),
            "regnety_040" => Self::y(96, 31.41, 2.24, 64, 22),
            "regnety_080" => Self::y(192, 76.82, 2.19, 56, 17),
            "regnety_160" => Self::y(200, 106.23, 2.48, 112, 18),
            "regnety_320" => Self::y(232, 115.89, 2.53, 232, 20),
            _ => {
                return Err(ModelError::UnknownModel {
                    name: name.to_string(),
                    known: Self::NAMES.to_vec(),
                })
            }
        })
    }

    /// The stages: timm's `generate_regnet` (per-block widths `w0 + i wa`, snapped to
    /// `w0 wm^k` and to multiples of 8), grouped by width, then `adjust_widths_groups_comp`
    /// (group width at most the bottleneck width, which is rounded to a multiple of it). Every
    /// stage has stride 2 (output stride 32).
    pub fn stages(&self) -> Result<Vec<RegNetStage>> {
        let (w0, wa, wm, q) = (self.w0 as f64, self.wa, self.wm, 8.0);
        if !(wa >= 0.0 && self.w0 > 0 && wm > 1.0 && self.w0.is_multiple_of(8) && self.depth > 0) {
            bail!("regnet: needs wa >= 0, w0 > 0 a multiple of 8, wm > 1, depth > 0: {self:?}")
        }
        let mut widths: Vec<usize> = Vec::with_capacity(self.depth);
        for i in 0..self.depth {
            let cont = i as f64 * wa + w0;
            let exp = round_even((cont / w0).ln() / wm.ln());
            let w = w0 * wm.powf(exp);
            widths.push((round_even(w / q) * q) as usize);
        }
        let mut stages: Vec<RegNetStage> = Vec::new();
        let mut sorted = widths.clone();
        sorted.sort_unstable();
        for w in sorted {
            match stages.last_mut() {
                Some(s) if s.width == w => s.depth += 1,
                _ => stages.push(RegNetStage {
                    width: w,
                    depth: 1,
                    group_width: self.group_w,
                    stride: 2,
                }),
            }
        }
        for s in &mut stages {
            let bottleneck = (s.width as f64 * self.bottle_ratio) as usize;
            let g = self.group_w.min(bottleneck);
            let bottleneck = (round_even(bottleneck as f64 / g as f64) * g as f64) as usize;
            s.width = (bottleneck as f64 / self.bottle_ratio) as usize;
            s.group_width = g;
        }
        Ok(stages)
    }

    /// Builds the network from `vb`, whose tensors are named as timm's `state_dict`.
    pub fn build(&self, vb: VarBuilder) -> Result<ResNet> {
        ResNet::new_regnet(self, vb)
    }
}

impl ResNet {
    /// A RegNet in the residual network's structure: a 3x3/2 conv-BN-ReLU stem without
    /// max-pool, bottleneck blocks `conv1` (1x1), `conv2` (3x3, strided, grouped), SE after
    /// `conv2`, `conv3` (1x1, no ReLU), a 1x1 strided projection shortcut, and `head.fc`.
    fn new_regnet(cfg: &RegNetConfig, vb: VarBuilder) -> Result<Self> {
        super::check_head_and_depth("regnet", cfg.num_classes, cfg.in_chans, cfg.drop_path_rate)?;
        let stages = cfg.stages()?;
        let mut b = Builder {
            params: Vec::new(),
            goog_init: false,
        };
        let vs = vb.pp("stem");
        let stem = b.conv(&vs.pp("conv"), cfg.in_chans, cfg.stem_width, 3, 2, 1, false)?;
        let bn1 = b.bn(&vs.pp("bn"), cfg.stem_width, false)?;
        let drop_probs = drop_path_rates(cfg.drop_path_rate, cfg.depth);
        let mut blocks = Vec::with_capacity(cfg.depth);
        let mut c_in = cfg.stem_width;
        for (si, stage) in stages.iter().enumerate() {
            let c_out = stage.width;
            let bottleneck = round_even(c_out as f64 * cfg.bottle_ratio) as usize;
            let groups = bottleneck / stage.group_width;
            for i in 0..stage.depth {
                let vs = vb.pp(format!("s{}", si + 1)).pp(format!("b{}", i + 1));
                let stride = if i == 0 { stage.stride } else { 1 };
                let pair = |b: &mut Builder, name: &str, ci, co, k, s, g, zero| {
                    let v = vs.pp(name);
                    Ok::<_, candle_core::Error>((
                        b.conv(&v.pp("conv"), ci, co, k, s, g, false)?,
                        b.bn(&v.pp("bn"), co, zero)?,
                    ))
                };
                let conv1 = pair(&mut b, "conv1", c_in, bottleneck, 1, 1, 1, false)?;
                let conv2 = pair(
                    &mut b, "conv2", bottleneck, bottleneck, 3, stride, groups, false,
                )?;
                let se = if cfg.se_ratio > 0.0 {
                    let rd = round_even(c_in as f64 * cfg.se_ratio) as usize;
                    let se = SqueezeExcite::with_reduced(&mut b, &vs.pp("se"), bottleneck, rd)?;
                    Some(BlockAttn::SqueezeExcite(se))
                } else {
                    None
                };
                let zero = cfg.zero_init_last;
                let conv3 = pair(&mut b, "conv3", bottleneck, c_out, 1, 1, 1, zero)?;
                let downsample = if c_in != c_out || stride != 1 {
                    let vd = vs.pp("downsample");
                    Some(Downsample {
                        avg_pool: false,
                        conv: b.conv(&vd.pp("conv"), c_in, c_out, 1, stride, 1, false)?,
                        bn: b.bn(&vd.pp("bn"), c_out, false)?,
                    })
                } else {
                    None
                };
                let index = blocks.len();
                blocks.push(Block {
                    branch: vec![conv1, conv2, conv3],
                    se,
                    attn_after: 1,
                    residual: true,
                    act_after_add: true,
                    downsample,
                    drop_prob: drop_probs[index],
                    index,
                });
                c_in = c_out;
            }
        }
        let vf = vb.pp("head").pp("fc");
        let w = b.get(
            &vf,
            &[cfg.num_classes, c_in],
            "weight",
            ParamKind::LinearWeightNormal,
        )?;
        let bias = b.get(&vf, &[cfg.num_classes], "bias", ParamKind::ZeroBias)?;
        Ok(ResNet::assemble(
            NetConfig::RegNet(cfg.clone()),
            Trunk::Conv(ConvTrunk {
                stem: Stem::Single(stem),
                bn1,
                max_pool: false,
                silu: false,
                head: None,
                blocks,
            }),
            candle_nn::Linear::new(w, Some(bias)),
            b.params,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    /// timm 0.5.4's stage widths, depths and group widths (printed by
    /// `[(s['out_chs'], s['depth'], s['group_width']) for s in
    /// timm.create_model(name)._get_stage_params(model_cfgs[name])]`).
    #[test]
    fn stages_match_timm() {
        type Stages = [(usize, usize, usize); 4];
        let want: [(&str, Stages); 5] = [
            (
                "regnety_002",
                [(24, 1, 8), (56, 1, 8), (152, 4, 8), (368, 7, 8)],
            ),
            (
                "regnety_040",
                [(128, 2, 64), (192, 6, 64), (512, 12, 64), (1088, 2, 64)],
            ),
            (
                "regnety_080",
                [(168, 2, 56), (448, 4, 56), (896, 10, 56), (2016, 1, 56)],
            ),
            (
                "regnety_160",
                [
                    (224, 2, 112),
                    (448, 4, 112),
                    (1232, 11, 112),
                    (3024, 1, 112),
                ],
            ),
            (
                "regnety_320",
                [
                    (232, 2, 232),
                    (696, 5, 232),
                    (1392, 12, 232),
                    (3712, 1, 232),
                ],
            ),
        ];
        for (name, stages) in want {
            let got: Vec<(usize, usize, usize)> = RegNetConfig::by_name(name)
                .unwrap()
                .stages()
                .unwrap()
                .iter()
                .map(|s| (s.width, s.depth, s.group_width))
                .collect();
            assert_eq!(got, stages, "{name}");
        }
    }

    /// timm's RegNet init: head weight `N(0, 0.01²)` and bias 0, the last BN gamma of each
    /// block 0, the others 1; and the classifier keys fine-tuning replaces.
    #[test]
    fn init_follows_timm() -> Result<()> {
        let cfg = NetConfig::from(RegNetConfig::by_name("regnety_002").unwrap());
        let model = cfg.build_seeded(&VarMap::new(), 5, DType::F32, &Device::Cpu)?;
        let get = |name: &str| {
            let p = model.params().iter().find(|p| p.name == name).unwrap();
            p.tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let w = get("head.fc.weight");
        let n = w.len() as f64;
        let std = (w.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / n).sqrt();
        assert!(
            (std / 0.01 - 1.0).abs() < 5.0 / (2.0 * n).sqrt(),
            "std {std}"
        );
        assert!(get("head.fc.bias").iter().all(|&x| x == 0.0));
        assert!(get("s1.b1.conv3.bn.weight").iter().all(|&x| x == 0.0));
        assert!(get("s1.b1.conv2.bn.weight").iter().all(|&x| x == 1.0));
        for key in ["head.fc.weight", "head.fc.bias"] {
            assert!(crate::checkpoint::CLASSIFIER.contains(&key));
        }
        Ok(())
    }
}
