//! What each model tensor is: trainable parameter or BatchNorm running statistic, and how
//! timm initialises it.

use candle_core::{bail, Result, Tensor, Var};

/// The role of one tensor in the model's state dict. It decides whether the optimizer sees the
/// tensor ([`ParamKind::is_trainable`]) and how [`init_timm`] fills it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// Convolution kernel `[O, I/groups, kh, kw]`: `kaiming_normal_(mode='fan_out', relu)`.
    ConvWeight,
    /// Convolution kernel with EfficientNet's init (`_init_weight_goog`, `fix_group_fanout`):
    /// `N(0, 2 / fan_out)` with `fan_out = O * kh * kw / groups`.
    ConvWeightGrouped {
        /// The conv's groups.
        groups: usize,
    },
    /// Linear weight `[out, in]` with EfficientNet's init: `U(±1/sqrt(out))`.
    LinearWeightFanOut,
    /// Convolution bias `[O]` (the SE convs): PyTorch default `U(±1/sqrt(fan_in))`.
    ConvBias {
        /// `I/groups * kh * kw` of the kernel.
        fan_in: usize,
    },
    /// BatchNorm gamma: 1, or 0 for the last BN of a residual branch (`zero_init_last`).
    BnWeight {
        /// Whether timm zero-initialises this gamma (bn3 in Bottleneck, bn2 in BasicBlock).
        zero_init: bool,
    },
    /// BatchNorm beta: 0.
    BnBias,
    /// BatchNorm running mean (a buffer, not trained): 0.
    BnRunningMean,
    /// BatchNorm running variance (a buffer, not trained): 1.
    BnRunningVar,
    /// A `Conv1d` kernel (ECA's `[1, 1, k]`), which timm's ResNet init leaves at PyTorch's
    /// default `kaiming_uniform_(a=sqrt(5))`: `U(±1/sqrt(fan_in))`.
    Conv1dWeight {
        /// `I/groups * k` of the kernel.
        fan_in: usize,
    },
    /// Linear weight `[out, in]`: PyTorch default `U(±1/sqrt(in))`.
    LinearWeight,
    /// Linear weight `[out, in]` of timm RegNet's head: `N(0, 0.01²)`.
    LinearWeightNormal,
    /// A bias timm zero-initialises (RegNet's head).
    ZeroBias,
    /// Linear bias `[out]`: PyTorch default `U(±1/sqrt(in))`.
    LinearBias {
        /// Input features of the layer.
        fan_in: usize,
    },
    /// timm's `trunc_normal_(std=.02)` (cut at ±2, i.e. ±100 std): the Vision Transformer's
    /// linear weights, class token and position embedding.
    TruncNormal02,
    /// A convolution kernel left at PyTorch's default `kaiming_uniform_(a=sqrt(5))`:
    /// `U(±1/sqrt(fan_in))` (the Vision Transformer's patch embedding).
    ConvWeightDefault {
        /// `I/groups * kh * kw` of the kernel.
        fan_in: usize,
    },
    /// LayerNorm gamma: 1.
    LnWeight,
    /// LayerNorm beta: 0.
    LnBias,
}

impl ParamKind {
    /// False for the BatchNorm running statistics, which have no gradient and must stay out of
    /// the optimizer and of weight decay.
    pub fn is_trainable(self) -> bool {
        !matches!(self, ParamKind::BnRunningMean | ParamKind::BnRunningVar)
    }
}

/// One named tensor of a model, named exactly as the timm `state_dict` key.
#[derive(Clone, Debug)]
pub struct Param {
    /// timm `state_dict` key, e.g. `layer1.0.conv1.weight`.
    pub name: String,
    /// What the tensor is.
    pub kind: ParamKind,
    /// The tensor the model computes with (a variable when built from a `VarMap`).
    pub tensor: Tensor,
}

impl Param {
    /// The tensor as a [`Var`] sharing its storage. Fails when the model was not built from a
    /// `VarMap` (for example from memory-mapped safetensors), since a copy would not train it.
    pub fn var(&self) -> Result<Var> {
        if !self.tensor.is_variable() {
            bail!(
                "{}: not a variable; build the model with VarBuilder::from_varmap to train or init it",
                self.name
            )
        }
        Var::from_tensor(&self.tensor)
    }
}

/// The naming rule behind [`ParamKind::is_trainable`], for code that only has a `VarMap`:
/// true for the BatchNorm buffers (`running_mean`, `running_var`, `num_batches_tracked`).
pub fn is_running_stat(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    matches!(last, "running_mean" | "running_var" | "num_batches_tracked")
}

/// 64-bit FNV-1a of a name: a stable per-tensor stream id for seeded generation.
pub fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// The values timm's `ResNet.init_weights`, `RegNet.__init__`, EfficientNet's `_init_weight_goog`
/// and `VisionTransformer.init_weights` (v0.5.4) give a tensor of
/// `kind` and `shape`,
/// drawn from `rng` (row-major order).
pub fn init_values(kind: ParamKind, shape: &[usize], rng: &mut loader::rng::Rng) -> Vec<f32> {
    let len: usize = shape.iter().product();
    let uniform = |rng: &mut loader::rng::Rng, bound: f64| -> Vec<f32> {
        (0..len)
            .map(|_| rng.uniform(-bound, bound) as f32)
            .collect()
    };
    match kind {
        ParamKind::ConvWeight => {
            let fan_out = shape[0] * shape[2..].iter().product::<usize>();
            let std = (2.0 / fan_out as f64).sqrt();
            (0..len).map(|_| (rng.normal() * std) as f32).collect()
        }
        ParamKind::ConvBias { fan_in }
        | ParamKind::LinearBias { fan_in }
        | ParamKind::Conv1dWeight { fan_in }
        | ParamKind::ConvWeightDefault { fan_in } => uniform(rng, 1.0 / (fan_in as f64).sqrt()),
        ParamKind::TruncNormal02 => (0..len)
            .map(|_| loop {
                // timm's `trunc_normal_` bounds are absolute (a=-2, b=2): redraw beyond them.
                let v = rng.normal() * 0.02;
                if (-2.0..=2.0).contains(&v) {
                    break v as f32;
                }
            })
            .collect(),
        ParamKind::LinearWeight => uniform(rng, 1.0 / (shape[1] as f64).sqrt()),
        ParamKind::LinearWeightFanOut => uniform(rng, 1.0 / (shape[0] as f64).sqrt()),
        ParamKind::ConvWeightGrouped { groups } => {
            let fan_out = shape[0] * shape[2..].iter().product::<usize>() / groups;
            let std = (2.0 / fan_out as f64).sqrt();
            (0..len).map(|_| (rng.normal() * std) as f32).collect()
        }
        ParamKind::LinearWeightNormal => (0..len).map(|_| (rng.normal() * 0.01) as f32).collect(),
        ParamKind::ZeroBias | ParamKind::LnBias => vec![0.0; len],
        ParamKind::LnWeight => vec![1.0; len],
        ParamKind::BnWeight { zero_init: true } | ParamKind::BnBias | ParamKind::BnRunningMean => {
            vec![0.0; len]
        }
        ParamKind::BnWeight { zero_init: false } | ParamKind::BnRunningVar => vec![1.0; len],
    }
}

/// Fills every tensor with timm's initialisation, deterministically: tensor `name` draws from
/// `Rng::for_item(seed, &[name_hash(name)])`, so the values do not depend on build order.
///
/// On the CPU the tensors are filled in parallel (each has its own generator: the same values);
/// elsewhere one by one, in order.
pub fn init_timm(params: &[Param], seed: u64) -> Result<()> {
    let fill = |p: &Param| -> Result<()> {
        let var = p.var()?;
        let mut rng = loader::rng::Rng::for_item(seed, &[name_hash(&p.name)]);
        let values = init_values(p.kind, p.tensor.dims(), &mut rng);
        let t = Tensor::from_vec(values, p.tensor.shape(), p.tensor.device())?
            .to_dtype(p.tensor.dtype())?;
        var.set(&t)
    };
    if params.iter().all(|p| p.tensor.device().is_cpu()) {
        use rayon::prelude::*;
        params.par_iter().try_for_each(fill)
    } else {
        params.iter().try_for_each(fill)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_stat_names() {
        assert!(is_running_stat("layer1.0.bn1.running_mean"));
        assert!(is_running_stat("bn1.running_var"));
        assert!(is_running_stat("conv1.1.num_batches_tracked"));
        assert!(!is_running_stat("bn1.weight"));
        assert!(!is_running_stat("fc.bias"));
        assert!(!ParamKind::BnRunningVar.is_trainable());
        assert!(ParamKind::BnWeight { zero_init: true }.is_trainable());
    }

    #[test]
    fn fnv1a_reference_values() {
        assert_eq!(name_hash(""), 0xCBF2_9CE4_8422_2325);
        assert_eq!(name_hash("a"), 0xAF63_DC4C_8601_EC8C);
    }
}
