//! Fine-tuning's treatment of a pretrained trunk (the recipe's `finetune` section): which
//! parameters are the trunk, a frozen trunk's gradients dropped before the step, and BatchNorm
//! statistics re-estimated on the new data.

use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::VarMap;
use shards::Split;

use super::{eval_loader, Result};
use crate::checkpoint::CLASSIFIER;
use crate::feed::Feed;
use crate::model::batch_norm::BN_MOMENTUM;
use crate::model::{is_running_stat, ResNet};

/// Whether the parameter `name` belongs to the classifier (the new head of a fine-tuned
/// network); every other parameter is the trunk.
pub fn is_head(name: &str) -> bool {
    CLASSIFIER.contains(&name)
}

/// Removes the trunk's gradients from `store`, so that the optimizer leaves the trunk alone this
/// update (no step, no weight decay, no moments, not in a global gradient norm), as PyTorch does
/// for parameters with `requires_grad = False`. Returns how many gradients were removed.
pub fn drop_trunk_grads(store: &mut GradStore, trainable: &[(String, Var)]) -> usize {
    trainable
        .iter()
        .filter(|(name, _)| !is_head(name))
        .filter(|(_, var)| store.remove(var.as_tensor()).is_some())
        .count()
}

/// What [`reestimate_bn`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BnEstimate {
    /// Batches the statistics were averaged over.
    pub batches: usize,
    /// Images in them.
    pub images: u64,
    /// BatchNorm layers whose statistics were replaced.
    pub layers: usize,
}

/// Replaces every BatchNorm running mean and variance of `model` (held in `varmap`) by the
/// average of its per-batch statistics over the first `num_batches` batches of `split` in file
/// order, read with `transform` in batches of `batch_size`: PyTorch's
/// `torch.optim.swa_utils.update_bn` (momentum `None`, a cumulative average; the variance is the
/// unbiased batch variance, as a training forward records it).
///
/// Each batch runs a training forward (batch statistics, stochastic depth drawn from a fixed
/// seed) with the running statistics set to zero first, so that afterwards they hold
/// `momentum × batch statistic`; the sums are kept in f64 and divided at the end. Nothing but the
/// running statistics changes. A split with fewer batches uses those it has.
pub fn reestimate_bn(
    model: &ResNet,
    varmap: &VarMap,
    feed: &Feed,
    split: Arc<Split>,
    transform: loader::Transform,
    (batch_size, num_workers, num_batches): (usize, usize, usize),
) -> Result<BnEstimate> {
    let mut stats: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .filter(|(name, _)| is_running_stat(name))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    stats.sort_by(|a, b| a.0.cmp(&b.0));
    let mut sums: Vec<Vec<f64>> = stats
        .iter()
        .map(|(_, v)| vec![0.0; v.elem_count()])
        .collect();
    let size = transform.size() as usize;
    let samples = (num_batches * batch_size) as u64;
    let mut loader = eval_loader(split, transform, batch_size, num_workers, samples, (0, 1))?;
    let (mut batches, mut images) = (0usize, 0u64);
    for batch in loader.epoch(0)? {
        let batch = batch?;
        // A last batch of one image has no batch variance; PyTorch would fail on it.
        if batch.len < 2 {
            continue;
        }
        for (_, var) in &stats {
            var.set(&var.zeros_like()?)?;
        }
        let xs = feed.images_for(batch.images(), batch.len, size, model.layout())?;
        drop(model.forward_train(&xs, 0)?);
        for ((_, var), sum) in stats.iter().zip(sums.iter_mut()) {
            let values = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            for (s, v) in sum.iter_mut().zip(values) {
                *s += v as f64 / BN_MOMENTUM;
            }
        }
        batches += 1;
        images += batch.len as u64;
    }
    if batches > 0 {
        for ((_, var), sum) in stats.iter().zip(&sums) {
            let mean: Vec<f32> = sum.iter().map(|s| (s / batches as f64) as f32).collect();
            let t = Tensor::from_vec(mean, var.shape(), var.device())?;
            var.set(&t.to_dtype(var.dtype())?)?;
        }
    }
    Ok(BnEstimate {
        batches,
        images,
        layers: stats.len() / 2,
    })
}
