//! The epoch plan: which sample each batch holds, as a pure function of the configuration.
//!
//! Without repeated augmentation this is PyTorch's `DistributedSampler`: permute the N indices,
//! pad (or, with `drop_last`, cut) to a multiple of the world size, rank r takes positions
//! r, r + W, r + 2W, ... With `repeats` = 3 it is timm's `RepeatAugSampler` (from DeiT): permute,
//! repeat every index 3 times in place (`[a, a, a, b, b, b, ...]`), pad to a multiple of W, rank r
//! takes positions r, r + W, ..., and keeps the first `floor(N // 256 * 256 / W)` of them, so an
//! epoch has as many samples as a plain one but only about N / 3 distinct images. The 3 copies
//! of an image sit at consecutive positions and so land on 3 different ranks.
//!
//! **Gradient accumulation.** A device that accumulates A micro-batches per optimiser step acts
//! as A virtual ranks (timm-semantics 2.8): rank r's micro-batch a of each step is taken from
//! virtual rank `r * A + a`. The copies of an image then fall in different micro-batches (so never
//! in the same BatchNorm batch), exactly as they would on A separate devices. The rank's batches
//! are delivered step by step: micro-batch 0..A of step 0, then of step 1, and so on.
//!
//! The permutation is seeded by (seed, epoch) with this crate's own generator, so the plan is the
//! same on every machine and thread count; it matches timm's semantics, not torch's exact draws.

use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// Everything the plan depends on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanConfig {
    /// Samples in the split.
    pub num_samples: u64,
    /// Run seed.
    pub seed: u64,
    /// Shuffle the order (training); `false` keeps index order (evaluation).
    pub shuffle: bool,
    /// Repeated augmentation factor: 1 = off, 3 = RSB A1/A2.
    pub repeats: u32,
    /// With repeats > 1: epoch length rounding (timm's `selected_round`, 256). 0 means no
    /// rounding: each rank keeps `ceil(N / W)` samples.
    pub repeat_round: u64,
    /// This device's rank.
    pub rank: u32,
    /// Number of devices.
    pub world_size: u32,
    /// Micro-batches per optimiser step on each device (gradient accumulation), at least 1.
    pub accum_steps: u32,
    /// Samples per micro-batch (the loader's batch size).
    pub batch_size: usize,
    /// Drop a last incomplete batch (and, without repeats, cut the epoch to a multiple of W).
    pub drop_last: bool,
    /// Evaluation across ranks: the one-rank epoch's batches are dealt out whole, batch `b` to
    /// rank `b % world_size`, so no sample is padded in or counted twice and every batch is
    /// exactly the one a one-rank run evaluates (needs `accum_steps = 1`, `repeats = 1`).
    #[serde(default)]
    pub split_batches: bool,
}

impl PlanConfig {
    /// A one-device, no-repeat plan over `num_samples` samples.
    pub fn new(num_samples: u64, batch_size: usize) -> Self {
        PlanConfig {
            num_samples,
            seed: 0,
            shuffle: true,
            repeats: 1,
            repeat_round: 256,
            rank: 0,
            world_size: 1,
            accum_steps: 1,
            batch_size,
            drop_last: false,
            split_batches: false,
        }
    }

    /// Checks the configuration, naming the first problem.
    pub fn validate(&self) -> Result<(), String> {
        if self.batch_size == 0 {
            return Err("batch size must be at least 1".into());
        }
        if self.world_size == 0 || self.rank >= self.world_size {
            return Err(format!(
                "rank {} is outside world size {}",
                self.rank, self.world_size
            ));
        }
        if self.accum_steps == 0 {
            return Err("accum_steps must be at least 1".into());
        }
        if self.repeats == 0 {
            return Err("repeats must be at least 1 (1 = no repeated augmentation)".into());
        }
        if self.split_batches && (self.accum_steps != 1 || self.repeats != 1) {
            return Err(
                "split_batches deals out whole one-rank batches: it needs accum_steps = 1 \
                 and repeats = 1"
                    .into(),
            );
        }
        if self.num_samples > u32::MAX as u64 {
            return Err(format!(
                "{} samples: at most 2^32 - 1 are supported",
                self.num_samples
            ));
        }
        Ok(())
    }
}

/// One planned sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedSample {
    /// Index into the split.
    pub index: u32,
    /// Position in the epoch's global (all ranks) order: unique per sample and epoch, so it keys
    /// the sample's random draws, and repeated copies of one image get different draws.
    pub position: u64,
}

/// One epoch's batches for one rank.
#[derive(Clone, Debug)]
pub struct EpochPlan {
    epoch: u64,
    samples: Vec<PlannedSample>,
    /// Start of each batch in `samples`, plus the end.
    batch_starts: Vec<usize>,
}

impl EpochPlan {
    /// Builds the plan of `epoch`.
    pub fn new(cfg: &PlanConfig, epoch: u64) -> Result<Self, String> {
        cfg.validate()?;
        if cfg.split_batches && cfg.world_size > 1 {
            let one = EpochPlan::new(
                &PlanConfig {
                    rank: 0,
                    world_size: 1,
                    split_batches: false,
                    ..cfg.clone()
                },
                epoch,
            )?;
            let (w, r) = (cfg.world_size as usize, cfg.rank as usize);
            let mut samples = Vec::new();
            let mut batch_starts = vec![0];
            for b in (r..one.num_batches()).step_by(w) {
                samples.extend_from_slice(one.batch(b));
                batch_starts.push(samples.len());
            }
            return Ok(EpochPlan {
                epoch,
                samples,
                batch_starts,
            });
        }
        let n = cfg.num_samples as usize;
        let virt = (cfg.world_size * cfg.accum_steps) as usize;
        let mut order: Vec<u32> = (0..n as u32).collect();
        if cfg.shuffle {
            Rng::for_item(cfg.seed, &[0x504c_414e, epoch]).shuffle(&mut order);
        }
        let reps = cfg.repeats as usize;
        // Global list: each index repeated in place; padded or cut to a multiple of V.
        let total = n * reps;
        let (global_len, per_virtual) = if reps > 1 {
            let padded = total.div_ceil(virt) * virt;
            let selected = if cfg.repeat_round > 0 {
                let r = cfg.repeat_round as usize;
                (n / r * r) / virt
            } else {
                n.div_ceil(virt)
            };
            (padded, selected)
        } else if cfg.drop_last {
            (n / virt * virt, n / virt)
        } else {
            (total.div_ceil(virt) * virt, total.div_ceil(virt))
        };
        let global = |p: usize| -> u32 {
            // Padding repeats the list from its start, as torch and timm do.
            order[(p % total.max(1)) / reps]
        };
        // Virtual rank v holds global positions v, v + V, ...; the first `per_virtual` are kept.
        let micro = cfg.batch_size;
        let chunks = if cfg.drop_last {
            per_virtual / micro
        } else {
            per_virtual.div_ceil(micro)
        };
        let mut samples = Vec::with_capacity(chunks * micro * cfg.accum_steps as usize);
        let mut batch_starts = vec![0];
        if total > 0 {
            for s in 0..chunks {
                for a in 0..cfg.accum_steps as usize {
                    let v = cfg.rank as usize * cfg.accum_steps as usize + a;
                    let lo = s * micro;
                    let hi = ((s + 1) * micro).min(per_virtual);
                    for j in lo..hi {
                        let p = j * virt + v;
                        debug_assert!(p < global_len);
                        samples.push(PlannedSample {
                            index: global(p),
                            position: p as u64,
                        });
                    }
                    batch_starts.push(samples.len());
                }
            }
        }
        Ok(EpochPlan {
            epoch,
            samples,
            batch_starts,
        })
    }

    /// The epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Number of batches (micro-batches) for this rank.
    pub fn num_batches(&self) -> usize {
        self.batch_starts.len() - 1
    }

    /// The samples of batch `b`.
    pub fn batch(&self, b: usize) -> &[PlannedSample] {
        &self.samples[self.batch_starts[b]..self.batch_starts[b + 1]]
    }

    /// All samples of this rank, in delivery order.
    pub fn samples(&self) -> &[PlannedSample] {
        &self.samples
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// The plans of every rank of `base.world_size` for `epoch`.
    fn all_ranks(base: &PlanConfig, epoch: u64) -> Vec<EpochPlan> {
        (0..base.world_size)
            .map(|rank| {
                EpochPlan::new(
                    &PlanConfig {
                        rank,
                        ..base.clone()
                    },
                    epoch,
                )
                .unwrap()
            })
            .collect()
    }

    fn counts(plans: &[EpochPlan]) -> HashMap<u32, usize> {
        let mut c = HashMap::new();
        for p in plans {
            for s in p.samples() {
                *c.entry(s.index).or_insert(0) += 1;
            }
        }
        c
    }

    #[test]
    fn plain_epoch_visits_each_index_once() {
        let cfg = PlanConfig::new(1000, 32);
        let p = EpochPlan::new(&cfg, 0).unwrap();
        assert_eq!(p.samples().len(), 1000);
        assert_eq!(p.num_batches(), 32);
        assert_eq!(p.batch(31).len(), 1000 - 31 * 32);
        let c = counts(std::slice::from_ref(&p));
        assert_eq!(c.len(), 1000);
        assert!(c.values().all(|&n| n == 1));
        // Shuffled, different per epoch, same for the same epoch.
        let q = EpochPlan::new(&cfg, 1).unwrap();
        assert_ne!(p.samples(), q.samples());
        assert_eq!(p.samples(), EpochPlan::new(&cfg, 0).unwrap().samples());
        let drop = EpochPlan::new(
            &PlanConfig {
                drop_last: true,
                ..cfg
            },
            0,
        )
        .unwrap();
        assert_eq!(drop.num_batches(), 31);
    }

    #[test]
    fn ranks_partition_the_epoch() {
        let base = PlanConfig {
            world_size: 4,
            ..PlanConfig::new(1002, 16)
        };
        let plans = all_ranks(&base, 3);
        // 1002 padded to 1004: two indices appear twice, as in DistributedSampler.
        let c = counts(&plans);
        assert_eq!(c.len(), 1002);
        assert_eq!(c.values().filter(|&&n| n == 2).count(), 2);
        assert!(plans.iter().all(|p| p.samples().len() == 251));
    }

    #[test]
    fn repeated_augmentation_matches_timm() {
        // N = 2000, 3 repeats, 4 ranks: each rank keeps floor(2000 // 256 * 256 / 4) = 448.
        let base = PlanConfig {
            repeats: 3,
            world_size: 4,
            ..PlanConfig::new(2000, 64)
        };
        let plans = all_ranks(&base, 0);
        for p in &plans {
            assert_eq!(p.samples().len(), 448);
        }
        // Copies of one image sit at consecutive global positions: different ranks.
        let mut where_: HashMap<u32, Vec<usize>> = HashMap::new();
        for (r, p) in plans.iter().enumerate() {
            for s in p.samples() {
                where_.entry(s.index).or_default().push(r);
            }
        }
        for (idx, ranks) in &where_ {
            let mut u = ranks.clone();
            u.sort();
            u.dedup();
            assert_eq!(
                u.len(),
                ranks.len(),
                "copies of {idx} share a rank: {ranks:?}"
            );
            assert!(ranks.len() <= 3);
        }
        // Most images are seen 3 times (the epoch keeps 1792 of 6000 positions: ~597 images).
        let threes = where_.values().filter(|r| r.len() == 3).count();
        assert!((590..=598).contains(&threes), "{threes}");
    }

    #[test]
    fn split_batches_deal_out_the_one_rank_batches() {
        let one = EpochPlan::new(&PlanConfig::new(1003, 50), 0).unwrap();
        assert_eq!(one.num_batches(), 21);
        let base = PlanConfig {
            world_size: 4,
            split_batches: true,
            shuffle: false,
            ..PlanConfig::new(1003, 50)
        };
        let plans = all_ranks(&base, 0);
        let mut seen = Vec::new();
        for (r, p) in plans.iter().enumerate() {
            for k in 0..p.num_batches() {
                assert_eq!(
                    p.batch(k),
                    EpochPlan::new(
                        &PlanConfig {
                            shuffle: false,
                            ..PlanConfig::new(1003, 50)
                        },
                        0
                    )
                    .unwrap()
                    .batch(k * 4 + r)
                );
                seen.extend(p.batch(k).iter().map(|s| s.index));
            }
        }
        seen.sort();
        assert_eq!(seen, (0..1003).collect::<Vec<u32>>(), "every sample once");
        assert_eq!(plans[0].num_batches(), 6);
        assert_eq!(plans[3].num_batches(), 5);
        let bad = PlanConfig {
            accum_steps: 2,
            ..base
        };
        assert!(bad.validate().unwrap_err().contains("accum_steps = 1"));
    }

    #[test]
    fn accumulation_puts_copies_in_different_micro_batches() {
        // One device, 4 micro-batches per step: copies must not share a micro-batch.
        let cfg = PlanConfig {
            repeats: 3,
            accum_steps: 4,
            repeat_round: 0,
            ..PlanConfig::new(600, 25)
        };
        let p = EpochPlan::new(&cfg, 2).unwrap();
        // The epoch keeps its plain length: 4 virtual ranks x ceil(600 / 4).
        assert_eq!(p.samples().len(), 600);
        assert_eq!(p.num_batches(), 24);
        for b in 0..p.num_batches() {
            let batch = p.batch(b);
            let mut idx: Vec<u32> = batch.iter().map(|s| s.index).collect();
            idx.sort();
            let n = idx.len();
            idx.dedup();
            assert_eq!(idx.len(), n, "batch {b} holds two copies of an image");
        }
        // The first 200 images of the permutation, each 3 times.
        let c = counts(std::slice::from_ref(&p));
        assert_eq!(c.len(), 200);
        assert!(c.values().all(|&n| n == 3));
        // Positions are unique: every copy gets its own random draws.
        let mut pos: Vec<u64> = p.samples().iter().map(|s| s.position).collect();
        pos.sort();
        pos.dedup();
        assert_eq!(pos.len(), 600);
    }
}
