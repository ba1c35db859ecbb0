//! Evaluation, on one rank or split over ranks.
//!
//! The validation set's one-rank batches are dealt out whole (batch `b` to rank `b % W`,
//! `PlanConfig::split_batches`), so no sample is counted twice or missed and each batch is
//! exactly the batch a one-rank run evaluates. Each rank writes its batches' counts and loss sums
//! into a vector indexed by batch; one sum over ranks (every entry has one contribution, the
//! others add zeros) and a sum over batches in order then give top-1, top-5 and the loss a
//! one-rank evaluation gives, bit for bit.

use std::sync::Arc;

use loader::{Loader, LoaderConfig, PlanConfig, Transform};
use shards::Split;

use super::{EvalResult, Result};
use crate::dist::{Collective, SingleRank};
use crate::feed::Feed;
use crate::metrics::topk_correct;
use crate::model::ResNet;

/// Values kept per batch: top-1 hits, top-5 hits, loss sum, images.
const PER_BATCH: usize = 4;

/// Evaluates `model` on `split` (in index order) with `transform`: top-1, top-5 and mean
/// cross-entropy, as timm's `validate`. `num_samples` 0 means the whole split.
pub fn evaluate(
    model: &ResNet,
    feed: &Feed,
    split: Arc<Split>,
    transform: Transform,
    batch_size: usize,
    num_workers: usize,
    num_samples: u64,
) -> Result<EvalResult> {
    evaluate_rank(
        model,
        feed,
        split,
        transform,
        batch_size,
        num_workers,
        num_samples,
        &mut SingleRank,
    )
}

/// [`evaluate`] as one rank of `comm`: this rank evaluates its share of the batches, and every
/// rank returns the result over the whole set.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_rank(
    model: &ResNet,
    feed: &Feed,
    split: Arc<Split>,
    transform: Transform,
    batch_size: usize,
    num_workers: usize,
    num_samples: u64,
    comm: &mut dyn Collective,
) -> Result<EvalResult> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let size = transform.size() as usize;
    let total = if num_samples == 0 {
        split.len()
    } else {
        num_samples.min(split.len())
    };
    let num_batches = (total as usize).div_ceil(batch_size.max(1));
    let mut plan = PlanConfig::new(total, batch_size);
    plan.shuffle = false;
    plan.rank = rank as u32;
    plan.world_size = world as u32;
    plan.split_batches = true;
    let mut cfg = LoaderConfig::new(transform, plan);
    cfg.num_workers = num_workers;
    let mut loader = Loader::new(split, cfg)?;
    let mut per_batch = vec![0f64; num_batches * PER_BATCH];
    // The weights stay as they are for the whole pass: the CPU fast path folds and lays out each
    // conv's filter once, not once per batch.
    crate::ops::cpu::with_eval_cache(|| {
        eval_batches(model, feed, &mut loader, size, world, rank, &mut per_batch)
    })?;
    comm.all_reduce_f64(&mut per_batch)?;
    let (mut n, mut c1, mut c5, mut loss_sum) = (0u64, 0u64, 0u64, 0f64);
    for v in per_batch.chunks(PER_BATCH) {
        c1 += v[0] as u64;
        c5 += v[1] as u64;
        loss_sum += v[2];
        n += v[3] as u64;
    }
    let pct = |c: u64| 100.0 * c as f64 / n.max(1) as f64;
    Ok(EvalResult {
        top1: pct(c1),
        top5: pct(c5),
        loss: loss_sum / n.max(1) as f64,
        samples: n,
    })
}

/// This rank's batches: their counts and loss sums into `per_batch` (indexed by one-rank batch).
fn eval_batches(
    model: &ResNet,
    feed: &Feed,
    loader: &mut Loader<Vec<u8>>,
    size: usize,
    world: usize,
    rank: usize,
    per_batch: &mut [f64],
) -> Result<()> {
    for batch in loader.epoch(0)? {
        let batch = batch?;
        if batch.len == 0 {
            continue;
        }
        let xs = feed.images_for(batch.images(), batch.len, size, model.layout())?;
        let logits = model.forward_eval(&xs)?;
        let labels = feed.labels(&batch.labels)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?.to_scalar::<f32>()?;
        let c = topk_correct(&logits, &batch.labels, &[1, 5])?;
        // This rank's k-th batch is the one-rank batch k * W + rank.
        let b = batch.batch_id * world + rank;
        let slot = &mut per_batch[b * PER_BATCH..(b + 1) * PER_BATCH];
        slot.copy_from_slice(&[
            c[0] as f64,
            c[1] as f64,
            loss as f64 * batch.len as f64,
            batch.len as f64,
        ]);
    }
    Ok(())
}
