//! timm's weight-decay parameter groups (`optim_factory.add_weight_decay` at v0.5.4).

use candle_core::Var;

/// A parameter with its `state_dict`-style name (`layer1.0.conv2.weight`).
#[derive(Clone, Debug)]
pub struct NamedVar {
    /// The parameter's name; also the key of its optimizer state.
    pub name: String,
    /// The parameter.
    pub var: Var,
}

/// Parameters that share a weight decay and a learning-rate factor.
#[derive(Clone, Debug)]
pub struct ParamGroup {
    /// L2 weight decay of this group; 0 also switches LAMB's trust ratio off for it.
    pub weight_decay: f64,
    /// This group's learning rate is the schedule's times this factor (1 but for a fine-tuned
    /// trunk, see [`scale_trunk_lr`]); as PyTorch's per-group `lr`.
    pub lr_scale: f64,
    /// The parameters, in a fixed order.
    pub params: Vec<NamedVar>,
}

/// True for BatchNorm buffers that candle-nn registers as `Var`s: names ending in `running_mean`,
/// `running_var` or `num_batches_tracked` (the last is a PyTorch buffer, matched defensively).
///
/// They have no gradient, but an optimizer that held them would give them state and count them in
/// norms; [`param_groups`] drops them.
pub fn is_buffer_name(name: &str) -> bool {
    ["running_mean", "running_var", "num_batches_tracked"]
        .iter()
        .any(|suffix| name.ends_with(suffix))
}

/// timm's rule for parameters without weight decay: `ndim <= 1 or name.endswith(".bias")`
/// (v0.5.4 tests `len(shape) == 1`; HEAD `ndim <= 1`, which also covers scalars), or a name in
/// the model's `no_weight_decay()` set: the Vision Transformer's [`NO_WEIGHT_DECAY`].
pub fn skips_weight_decay(name: &str, rank: usize) -> bool {
    rank <= 1 || name.ends_with(".bias") || NO_WEIGHT_DECAY.contains(&name)
}

/// timm v0.5.4's `VisionTransformer.no_weight_decay()`: `{'pos_embed', 'cls_token',
/// 'dist_token'}` (no other supported model has tensors of these names).
pub const NO_WEIGHT_DECAY: [&str; 3] = ["pos_embed", "cls_token", "dist_token"];

/// Splits named variables into timm's two groups: `[no-decay (wd 0), decay (weight_decay)]`.
///
/// * BatchNorm buffers ([`is_buffer_name`]) and non-float variables are left out.
/// * Within a group parameters are sorted by name, so the order does not depend on the
///   `HashMap` of a `VarMap` (`varmap.data().lock()` gives `(name, var)` pairs).
/// * An empty group is still returned, so the result always has two groups.
pub fn param_groups<I>(named_vars: I, weight_decay: f64) -> Vec<ParamGroup>
where
    I: IntoIterator<Item = (String, Var)>,
{
    let mut no_decay = Vec::new();
    let mut decay = Vec::new();
    for (name, var) in named_vars {
        if is_buffer_name(&name) || !var.dtype().is_float() {
            continue;
        }
        let target = if skips_weight_decay(&name, var.rank()) {
            &mut no_decay
        } else {
            &mut decay
        };
        target.push(NamedVar { name, var });
    }
    no_decay.sort_by(|a, b| a.name.cmp(&b.name));
    decay.sort_by(|a, b| a.name.cmp(&b.name));
    vec![
        ParamGroup {
            weight_decay: 0.0,
            lr_scale: 1.0,
            params: no_decay,
        },
        ParamGroup {
            weight_decay,
            lr_scale: 1.0,
            params: decay,
        },
    ]
}

/// Fine-tuning's lower trunk learning rate: every group is split in two, the parameters whose
/// names `is_head` accepts (the new classifier) keeping the group's factor, the others (the
/// pretrained trunk) getting it times `trunk_scale`. A factor of 1 returns the groups unchanged,
/// so a run without the option steps exactly as before. Empty groups are dropped.
pub fn scale_trunk_lr(
    groups: Vec<ParamGroup>,
    trunk_scale: f64,
    is_head: impl Fn(&str) -> bool,
) -> Vec<ParamGroup> {
    if trunk_scale == 1.0 {
        return groups;
    }
    let mut out = Vec::with_capacity(2 * groups.len());
    for g in groups {
        let (head, trunk): (Vec<NamedVar>, Vec<NamedVar>) =
            g.params.into_iter().partition(|p| is_head(&p.name));
        for (params, lr_scale) in [(trunk, g.lr_scale * trunk_scale), (head, g.lr_scale)] {
            if !params.is_empty() {
                out.push(ParamGroup {
                    weight_decay: g.weight_decay,
                    lr_scale,
                    params,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn var(shape: &[usize]) -> Var {
        Var::zeros(shape, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn split_follows_timm_and_drops_bn_buffers() {
        let vars = vec![
            ("conv1.weight".to_string(), var(&[4, 3, 3, 3])),
            ("bn1.weight".to_string(), var(&[4])),
            ("bn1.bias".to_string(), var(&[4])),
            ("bn1.running_mean".to_string(), var(&[4])),
            ("bn1.running_var".to_string(), var(&[4])),
            ("fc.weight".to_string(), var(&[10, 4])),
            ("fc.bias".to_string(), var(&[10])),
        ];
        let groups = param_groups(vars, 0.02);
        let names = |g: &ParamGroup| g.params.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        assert_eq!(groups[0].weight_decay, 0.0);
        assert_eq!(names(&groups[0]), ["bn1.bias", "bn1.weight", "fc.bias"]);
        assert_eq!(groups[1].weight_decay, 0.02);
        assert_eq!(names(&groups[1]), ["conv1.weight", "fc.weight"]);

        let same = scale_trunk_lr(groups.clone(), 1.0, |n| n.starts_with("fc."));
        assert_eq!(same.len(), 2);
        let split = scale_trunk_lr(groups, 0.1, |n| n.starts_with("fc."));
        let summary: Vec<_> = split
            .iter()
            .map(|g| (g.weight_decay, g.lr_scale, names(g)))
            .collect();
        assert_eq!(
            summary,
            [
                (0.0, 0.1, vec!["bn1.bias".to_string(), "bn1.weight".into()]),
                (0.0, 1.0, vec!["fc.bias".to_string()]),
                (0.02, 0.1, vec!["conv1.weight".to_string()]),
                (0.02, 1.0, vec!["fc.weight".to_string()]),
            ]
        );
    }

    /// A ViT's groups as timm's `add_weight_decay(model, wd, model.no_weight_decay())`: the class
    /// token and position embedding (3-D) join the norms and biases without decay.
    #[test]
    fn vit_tokens_and_position_embedding_skip_decay() {
        use crate::model::VitConfig;
        use candle_core::{DType, Device};
        let cfg = VitConfig {
            depth: 1,
            img_size: 32,
            ..VitConfig::by_name("vit_tiny_patch16_224").unwrap()
        };
        let model = crate::model::NetConfig::from(cfg)
            .build_seeded(&candle_nn::VarMap::new(), 0, DType::F32, &Device::Cpu)
            .unwrap();
        let groups = param_groups(model.trainable_vars().unwrap(), 0.05);
        let names = |g: &ParamGroup| g.params.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(&groups[1]),
            [
                "blocks.0.attn.proj.weight",
                "blocks.0.attn.qkv.weight",
                "blocks.0.mlp.fc1.weight",
                "blocks.0.mlp.fc2.weight",
                "head.weight",
                "patch_embed.proj.weight",
            ]
        );
        let no_decay = names(&groups[0]);
        assert!(no_decay.contains(&"cls_token".to_string()), "{no_decay:?}");
        assert!(no_decay.contains(&"pos_embed".to_string()), "{no_decay:?}");
        // Tokens 2, patch bias 1, per block 2 norms x 2 + 4 biases, final norm 2, head bias 1.
        assert_eq!(no_decay.len(), 2 + 1 + 8 + 2 + 1, "{no_decay:?}");
    }
}
