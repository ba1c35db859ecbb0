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

use super::real::SplitReal;
use super::{EvalResult, RealScores, Result};
use crate::dist::{Collective, SingleRank};
use crate::feed::Feed;
use crate::metrics::{topk_correct, topk_correct_multi};
use crate::model::ResNet;

/// Values kept per batch: top-1 hits, top-5 hits, loss sum, images, and the ReaL top-1 hits,
/// top-5 hits and images counted.
const PER_BATCH: usize = 7;

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
    let opts = EvalOptions {
        num_samples,
        ..EvalOptions::new(batch_size, num_workers)
    };
    evaluate_impl(model, feed, split, transform, opts, comm)
}

/// Images an evaluation of `split` covers: the first `num_samples` (0: all).
pub fn eval_images(split: &Split, num_samples: u64) -> u64 {
    match num_samples {
        0 => split.len(),
        n => n.min(split.len()),
    }
}

/// The loader of an evaluation: the first `num_samples` images of `split` (0: all) in index
/// order, in batches of `batch_size` on `num_workers` threads; with `(rank, world)` ranks, this
/// rank's whole one-rank batches (`PlanConfig::split_batches`).
pub fn eval_loader(
    split: Arc<Split>,
    transform: Transform,
    batch_size: usize,
    num_workers: usize,
    num_samples: u64,
    (rank, world): (usize, usize),
) -> Result<Loader<Vec<u8>>> {
    let mut plan = PlanConfig::new(eval_images(&split, num_samples), batch_size);
    plan.shuffle = false;
    plan.rank = rank as u32;
    plan.world_size = world as u32;
    plan.split_batches = true;
    let mut cfg = LoaderConfig::new(transform, plan);
    cfg.num_workers = num_workers;
    Ok(Loader::new(split, cfg)?)
}

/// Options of [`evaluate_with`] beyond the model, data and transform.
pub struct EvalOptions<'a> {
    /// Images per batch.
    pub batch_size: usize,
    /// Loader threads.
    pub num_workers: usize,
    /// Only the first N images of the split (0: all).
    pub num_samples: u64,
    /// ImageNet-ReaL label lists (see [`super::real`]): the result's `real` then holds ReaL
    /// top-1 and top-5 over the images whose list is not empty.
    pub real: Option<&'a SplitReal>,
    /// Called after each batch with the images evaluated so far (progress displays).
    pub progress: Option<&'a mut dyn FnMut(u64)>,
}

impl EvalOptions<'_> {
    /// Batches of `batch_size` on `num_workers` loader threads, the whole split, no ReaL, no
    /// progress.
    pub fn new(batch_size: usize, num_workers: usize) -> Self {
        EvalOptions {
            batch_size,
            num_workers,
            num_samples: 0,
            real: None,
            progress: None,
        }
    }
}

/// [`evaluate`] with [`EvalOptions`]: ImageNet-ReaL scores and a progress callback.
pub fn evaluate_with(
    model: &ResNet,
    feed: &Feed,
    split: Arc<Split>,
    transform: Transform,
    opts: EvalOptions<'_>,
) -> Result<EvalResult> {
    evaluate_impl(model, feed, split, transform, opts, &mut SingleRank)
}

fn evaluate_impl(
    model: &ResNet,
    feed: &Feed,
    split: Arc<Split>,
    transform: Transform,
    opts: EvalOptions<'_>,
    comm: &mut dyn Collective,
) -> Result<EvalResult> {
    let mut opts = opts;
    let (batch_size, num_workers, num_samples) =
        (opts.batch_size, opts.num_workers, opts.num_samples);
    let (rank, world) = (comm.rank(), comm.world_size());
    let size = transform.size() as usize;
    let total = eval_images(&split, num_samples);
    let num_batches = (total as usize).div_ceil(batch_size.max(1));
    let mut loader = eval_loader(
        split,
        transform,
        batch_size,
        num_workers,
        num_samples,
        (rank, world),
    )?;
    let mut per_batch = vec![0f64; num_batches * PER_BATCH];
    // The weights stay as they are for the whole pass: the CPU fast path folds and lays out each
    // conv's filter once, not once per batch.
    crate::ops::cpu::with_eval_cache(|| {
        eval_batches(
            model,
            feed,
            &mut loader,
            size,
            (world, rank),
            &mut opts,
            &mut per_batch,
        )
    })?;
    comm.all_reduce_f64(&mut per_batch)?;
    let (mut n, mut c1, mut c5, mut loss_sum) = (0u64, 0u64, 0u64, 0f64);
    let (mut real_n, mut real_c1, mut real_c5) = (0u64, 0u64, 0u64);
    for v in per_batch.chunks(PER_BATCH) {
        c1 += v[0] as u64;
        c5 += v[1] as u64;
        loss_sum += v[2];
        n += v[3] as u64;
        real_c1 += v[4] as u64;
        real_c5 += v[5] as u64;
        real_n += v[6] as u64;
    }
    let pct = |c: u64, n: u64| 100.0 * c as f64 / n.max(1) as f64;
    Ok(EvalResult {
        top1: pct(c1, n),
        top5: pct(c5, n),
        loss: loss_sum / n.max(1) as f64,
        samples: n,
        real: opts.real.map(|_| RealScores {
            top1: pct(real_c1, real_n),
            top5: pct(real_c5, real_n),
            samples: real_n,
        }),
    })
}

/// This rank's batches: their counts and loss sums into `per_batch` (indexed by one-rank batch).
fn eval_batches(
    model: &ResNet,
    feed: &Feed,
    loader: &mut Loader<Vec<u8>>,
    size: usize,
    (world, rank): (usize, usize),
    opts: &mut EvalOptions<'_>,
    per_batch: &mut [f64],
) -> Result<()> {
    let mut done = 0u64;
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
        let (r, real_n) = match opts.real {
            Some(real) => {
                let lists: Vec<&[u32]> = batch
                    .indices
                    .iter()
                    .map(|&i| real.labels(i as usize))
                    .collect();
                topk_correct_multi(&logits, &lists, &[1, 5])?
            }
            None => (vec![0, 0], 0),
        };
        // This rank's k-th batch is the one-rank batch k * W + rank.
        let b = batch.batch_id * world + rank;
        let slot = &mut per_batch[b * PER_BATCH..(b + 1) * PER_BATCH];
        slot.copy_from_slice(&[
            c[0] as f64,
            c[1] as f64,
            loss as f64 * batch.len as f64,
            batch.len as f64,
            r[0] as f64,
            r[1] as f64,
            real_n as f64,
        ]);
        done += batch.len as u64;
        if let Some(p) = &mut opts.progress {
            p(done);
        }
    }
    Ok(())
}
