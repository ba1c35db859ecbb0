//! Learning-rate schedules: cosine decay with linear warmup and a cooldown tail.
//!
//! [`CosineWithWarmup`] reproduces timm v0.5.4 `CosineLRScheduler` as `create_scheduler` built it for
//! the 2021 RSB runs: `cycle_mul = 1`, `cycle_limit = 1`, `warmup_prefix = False`, `k_decay = 1`, no
//! noise. With `t` the schedule time (an epoch index, or an update index with
//! [`Granularity::PerUpdate`]), `T` the cosine length and `W` the warmup length in the same unit:
//!
//! ```text
//! t <  W       lr = warmup_lr + t * (base_lr - warmup_lr) / W          (t = 0 trains at warmup_lr)
//! W <= t < T   lr = min_lr + 0.5 * (base_lr - min_lr) * (1 + cos(pi * t / T))
//! t >= T       lr = min_lr                                             (the cooldown epochs)
//! ```
//!
//! The cosine is counted from `t = 0`, not from the end of the warmup, so at `t = W` the rate is
//! already slightly below `base_lr` (timm semantics §2.7). The run lasts `epochs + cooldown_epochs`
//! epochs (`scheduler_factory.create_scheduler`: `num_epochs = get_cycle_length() + cooldown_epochs`).
//!
//! # Granularity
//!
//! * [`Granularity::PerEpoch`] (timm v0.5.4, what RSB used): `t` is the epoch index. timm's
//!   `train.py` calls `lr_scheduler.step(epoch + 1)` after every epoch and the constructor sets the
//!   warmup rate, so every update of epoch `e` trains at `lr(e)`; `step_update` is a no-op.
//! * [`Granularity::PerUpdate`] (timm HEAD `--sched-on-updates`): `scheduler_factory` multiplies
//!   `t_initial`, `warmup_t` and `cooldown_t` by `updates_per_epoch`, and `train_one_epoch` calls
//!   `step_update(num_updates)` after each optimizer update (`num_updates` counts completed updates).
//!   So global update `u` (0-based: `u = epoch * updates_per_epoch + i`) trains at `lr(u)` with
//!   `T = epochs * updates_per_epoch` and `W = warmup_epochs * updates_per_epoch`, all integers.
//!
//! Both are pure functions of their arguments, so resuming at any step reproduces the rate exactly.

/// Whether the learning rate changes at epoch boundaries or after every optimizer update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    /// timm v0.5.4: one rate per epoch (RSB 2021).
    PerEpoch,
    /// timm HEAD `--sched-on-updates`: warmup and cosine counted in optimizer updates.
    PerUpdate {
        /// Optimizer updates per epoch (after gradient accumulation). Must be at least 1.
        updates_per_epoch: u64,
    },
}

/// Cosine decay with linear warmup (timm v0.5.4 `CosineLRScheduler`, see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct CosineWithWarmup {
    /// Peak rate (`base_values` in timm; the optimizer's `lr` after LR scaling).
    pub base_lr: f64,
    /// Rate at `t = 0`, rising linearly towards `base_lr` (`--warmup-lr`, 1e-4 in 2021).
    pub warmup_lr: f64,
    /// Warmup length in epochs (`--warmup-epochs`).
    pub warmup_epochs: u64,
    /// Floor of the cosine and rate of the cooldown epochs (`--min-lr`, 1e-6 in 2021).
    pub min_lr: f64,
    /// Cosine length in epochs (`t_initial = --epochs`).
    pub epochs: u64,
    /// Epochs at `min_lr` after the cosine (`--cooldown-epochs`, default 10 in v0.5.4).
    pub cooldown_epochs: u64,
    /// Epoch or update granularity.
    pub granularity: Granularity,
}

impl CosineWithWarmup {
    /// Total number of training epochs: `epochs + cooldown_epochs`.
    pub fn total_epochs(&self) -> u64 {
        self.epochs + self.cooldown_epochs
    }

    /// The rate timm's `_get_lr(t)` gives, with `t`, `warmup_t` and `t_initial` in one unit.
    fn lr_at_time(&self, t: u64, warmup_t: u64, t_initial: u64) -> f64 {
        if t < warmup_t {
            // Same operation order as timm: warmup_lr_init + t * ((base - warmup_lr_init) / warmup_t).
            let slope = (self.base_lr - self.warmup_lr) / warmup_t as f64;
            return self.warmup_lr + t as f64 * slope;
        }
        // cycle_limit = 1: only the first cycle (i = t // t_initial = 0) follows the cosine.
        if t_initial == 0 || t >= t_initial {
            return self.min_lr;
        }
        let cos = (std::f64::consts::PI * t as f64 / t_initial as f64).cos();
        self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + cos)
    }

    /// Rate for every update of epoch `epoch` under [`Granularity::PerEpoch`] (timm v0.5.4).
    ///
    /// This ignores `granularity`; use [`CosineWithWarmup::lr_at`] to honour it.
    pub fn lr_at_epoch(&self, epoch: u64) -> f64 {
        self.lr_at_time(epoch, self.warmup_epochs, self.epochs)
    }

    /// Rate for global optimizer update `step` (0-based, counted over the whole run), honouring
    /// `granularity`: the epoch rate of `step / updates_per_epoch` per epoch, or the per-update
    /// cosine of timm HEAD `--sched-on-updates`.
    ///
    /// `steps_per_epoch` is only used by [`Granularity::PerEpoch`]; a value of 0 is treated as 1.
    /// [`Granularity::PerUpdate`] uses its own `updates_per_epoch`.
    pub fn lr_at(&self, step: u64, steps_per_epoch: u64) -> f64 {
        match self.granularity {
            Granularity::PerEpoch => self.lr_at_epoch(step / steps_per_epoch.max(1)),
            Granularity::PerUpdate { updates_per_epoch } => self.lr_at_time(
                step,
                self.warmup_epochs * updates_per_epoch,
                self.epochs * updates_per_epoch,
            ),
        }
    }

    /// One line explaining the schedule, for the run log.
    pub fn describe(&self) -> String {
        let unit = match self.granularity {
            Granularity::PerEpoch => "per epoch (timm v0.5.4)".to_string(),
            Granularity::PerUpdate { updates_per_epoch } => format!(
                "per update (timm HEAD --sched-on-updates, {updates_per_epoch} updates/epoch)"
            ),
        };
        format!(
            "cosine lr {unit}: warmup {} epochs from {:e}, peak {:e}, cosine over {} epochs to {:e}, \
             then {} cooldown epochs at {:e} ({} epochs in all)",
            self.warmup_epochs,
            self.warmup_lr,
            self.base_lr,
            self.epochs,
            self.min_lr,
            self.cooldown_epochs,
            self.min_lr,
            self.total_epochs()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a1() -> CosineWithWarmup {
        CosineWithWarmup {
            base_lr: 5e-3,
            warmup_lr: 1e-4,
            warmup_epochs: 5,
            min_lr: 1e-6,
            epochs: 600,
            cooldown_epochs: 10,
            granularity: Granularity::PerEpoch,
        }
    }

    #[test]
    fn warmup_values_from_the_reference_doc() {
        let s = a1();
        let want = [1.0e-4, 1.08e-3, 2.06e-3, 3.04e-3, 4.02e-3];
        for (e, w) in want.iter().enumerate() {
            assert!((s.lr_at_epoch(e as u64) - w).abs() < 1e-12, "epoch {e}");
        }
        let e5 = s.lr_at_epoch(5);
        assert!(e5 < 5e-3 && (e5 - 4.9991e-3).abs() < 1e-7, "{e5}");
        assert_eq!(s.lr_at_epoch(600), 1e-6);
        assert_eq!(s.lr_at_epoch(609), 1e-6);
        assert_eq!(s.total_epochs(), 610);
    }

    #[test]
    fn per_epoch_steps_share_the_epoch_rate() {
        let s = a1();
        assert_eq!(s.lr_at(0, 625), s.lr_at_epoch(0));
        assert_eq!(s.lr_at(624, 625), s.lr_at_epoch(0));
        assert_eq!(s.lr_at(625, 625), s.lr_at_epoch(1));
    }

    #[test]
    fn per_update_matches_per_epoch_at_epoch_boundaries() {
        let mut s = a1();
        s.granularity = Granularity::PerUpdate {
            updates_per_epoch: 7,
        };
        for e in [0u64, 3, 5, 100, 599, 600, 605] {
            let a = s.lr_at(e * 7, 0);
            let b = s.lr_at_epoch(e);
            assert!((a - b).abs() <= 1e-12 * b.abs(), "epoch {e}: {a} vs {b}");
        }
        assert!(s.lr_at(1, 0) > s.lr_at(0, 0));
    }
}
