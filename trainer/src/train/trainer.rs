//! One rank's training run, in parts: set-up ([`Trainer::new`]), an update
//! ([`Trainer::update`]: the micro-batches' forward and backward, the gradient reduction over
//! ranks, the queued optimizer step), metrics, evaluation, checkpoints. With one rank the
//! collective is [`SingleRank`] and every reduction is the identity.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use indicatif::{ProgressBar, ProgressStyle};
use loader::mix::{mixed_targets, MixDraw, MixKind};
use loader::{EpochRun, Loader, LoaderConfig, LoaderState, PlanConfig, Transform};
use serde_json::json;
use sha2::{Digest, Sha256};
use shards::Split;

use super::eval::evaluate_rank;
use super::finetune;
use super::grads::{BucketReducer, GradAccumulator};
use super::{
    build_model, eval_transform, io_err, mix_config, open_split, rand_augment, recipe_hash,
    train_transform, EvalResult, Progress, Result, TrainError, TrainOptions, TrainSummary,
};
use crate::checkpoint::{self, LossWindow, RunState};
use crate::dist::{Collective, TreeSum};
use crate::feed::Feed;
use crate::loss::{Targets, TrainLoss};
use crate::metrics::MetricsWriter;
use crate::model::{ActivationLayout, ResNet};
use crate::optim::{param_groups, scale_trunk_lr, TrainOptimizer};
use crate::schedule::CosineWithWarmup;
use crate::transfer::{DynStorage, Upload, EXTRA_BUFFERS};

/// Tags that keep the run's random streams apart.
const DROP_PATH_TAG: u64 = 0x4452_4f50;

/// Progress output of rank 0 (the other ranks are quiet).
pub(super) struct Log {
    progress: Progress,
    bar: Option<ProgressBar>,
}

impl Log {
    pub(super) fn line(&self, text: &str) {
        match (&self.bar, self.progress) {
            (_, Progress::Quiet) => {}
            (Some(bar), _) => bar.println(text),
            (None, _) => eprintln!("{text}"),
        }
    }
}

/// A micro-batch whose copy to the device has started; its images come from
/// [`Upload::next_images`], in order.
struct Staged {
    len: usize,
    labels: Vec<u32>,
    lam: f64,
}

/// What the rank's loop position needs between updates.
struct EpochCursor<'r> {
    run: EpochRun<'r, DynStorage>,
    epoch: u64,
    /// Micro-batches taken from the loader this epoch (one ahead of the step).
    fetched: usize,
    /// The micro-batches this epoch uses end here (a remainder of fewer than `accum` is left).
    end_batch: usize,
    ahead: Option<Staged>,
}

/// Consecutive updates with a non-finite loss, as their losses are read.
#[derive(Clone, Copy, Debug, Default)]
struct NonFiniteRun {
    /// How many.
    count: u64,
    /// The first of them (update number, 1-based).
    first: u64,
}

/// The window of a metrics line: its timing, and the losses of the updates since the last
/// line. Each update's loss is the mean over the update's micro-batches of all ranks, as a line
/// logged it before (`loss_last`); the line's `loss` is the mean of those over the window,
/// summed in f64 in update order. The sum so far travels in checkpoints
/// ([`checkpoint::LossWindow`]), so a resumed run writes the same lines.
struct Window {
    start: Instant,
    wait_s: f64,
    images: u64,
    /// This rank's per-update loss sums (micro-batches summed, unscaled), on the device and not
    /// yet read: read and reduced over the ranks only for a metrics line or a checkpoint.
    pending: Vec<Tensor>,
    /// The updates already read, and their losses' sum.
    loss: LossWindow,
    /// The loss of the last update read.
    loss_last: f64,
}

impl Window {
    fn new() -> Self {
        Window {
            start: Instant::now(),
            wait_s: 0.0,
            images: 0,
            pending: Vec::new(),
            loss: LossWindow::default(),
            loss_last: f64::NAN,
        }
    }

    /// A new timing window that keeps the losses (the set-up and the evaluation are not timed).
    fn restart_clock(&mut self) {
        self.start = Instant::now();
        self.wait_s = 0.0;
        self.images = 0;
    }

    /// Adds updates' losses (each already the mean over the update's micro-batches), in order.
    fn add_losses(&mut self, losses: &[f64]) {
        let mut sum = self.loss.loss_sum();
        for &l in losses {
            sum += l;
            self.loss_last = l;
        }
        self.loss = LossWindow::new(self.loss.updates + losses.len() as u64, sum);
    }

    /// The mean loss of the window's updates.
    fn mean_loss(&self) -> f64 {
        self.loss.loss_sum() / self.loss.updates as f64
    }
}

/// One rank of a run (see the module docs).
pub struct Trainer<'a> {
    opts: &'a TrainOptions,
    comm: &'a mut dyn Collective,
    rank: usize,
    world: usize,
    ckpt_dir: PathBuf,
    hash: String,
    num_classes: usize,
    /// Micro-batches per update on this rank.
    accum: usize,
    size: usize,
    seed: u64,
    num_batches: usize,
    updates_per_epoch: u64,
    total_epochs: u64,
    total_steps: u64,
    feed: Feed,
    upload: Box<dyn Upload>,
    val_split: Arc<Split>,
    val_transform: Transform,
    eval_workers: usize,
    varmap: VarMap,
    model: ResNet,
    optimizer: Box<dyn TrainOptimizer>,
    trainable: Vec<(String, Var)>,
    schedule: CosineWithWarmup,
    loss_fn: TrainLoss,
    mix: loader::mix::MixConfig,
    mixup: bool,
    /// Updates done.
    step: u64,
    /// Where the loader continues.
    state: LoaderState,
    metrics: Option<MetricsWriter>,
    log: Log,
    window: Window,
    backward_logged: bool,
    /// Whether the ranks agreed at the last metrics line to stop (a stop request on any rank).
    stop_agreed: bool,
    /// The current run of consecutive updates with a non-finite loss.
    nonfinite: NonFiniteRun,
    /// The step of the newest checkpoint written with no non-finite update before it in the
    /// current run of them (where `latest` goes back to when the run diverges).
    last_good_step: Option<u64>,
    last_eval: Option<EvalResult>,
    t_start: Instant,
}

impl<'a> Trainer<'a> {
    /// Sets up rank `comm.rank()` of a run: data, loader, model, optimizer, schedule, and the
    /// checkpoint to resume from. Returns the trainer and its loader.
    pub fn new(
        opts: &'a TrainOptions,
        comm: &'a mut dyn Collective,
    ) -> Result<(Self, Loader<DynStorage>)> {
        let t_start = Instant::now();
        let recipe = &opts.recipe;
        let (rank, world) = (comm.rank(), comm.world_size());
        recipe
            .validate()
            .map_err(|errs| TrainError::Recipe(errs.iter().map(|e| e.to_string()).collect()))?;
        if recipe.run.micro_batch < 2 {
            return Err(TrainError::Unsupported(
                "run.micro_batch must be at least 2 (BatchNorm needs more than one value)".into(),
            ));
        }
        let virtual_ranks = recipe.accumulation_steps() as usize;
        if !virtual_ranks.is_multiple_of(world) {
            return Err(TrainError::Unsupported(format!(
                "run.global_batch {} / run.micro_batch {} = {virtual_ranks} micro-batches per \
                 update cannot be shared by {world} ranks: use a world size that divides \
                 {virtual_ranks}, or change run.micro_batch",
                recipe.run.global_batch, recipe.run.micro_batch
            )));
        }
        let accum = virtual_ranks / world;
        let run_dir = &opts.run_dir;
        let ckpt_dir = run_dir.join("checkpoints");
        if rank == 0 {
            std::fs::create_dir_all(&ckpt_dir).map_err(io_err(&ckpt_dir))?;
        }
        let hash = recipe_hash(recipe)?;

        // Data: every rank reads the same shards and takes its part of the plan.
        let (train_split, data_classes) = open_split(&opts.data_dir, "train")?;
        let (val_split, _) = open_split(&opts.data_dir, "val")?;
        let num_classes = match recipe.model.num_classes {
            0 => data_classes,
            n if n as usize == data_classes => data_classes,
            n => {
                return Err(TrainError::Data {
                    path: opts.data_dir.clone(),
                    message: format!(
                        "model.num_classes = {n}, but the manifest has {data_classes} classes"
                    ),
                })
            }
        };
        let micro = recipe.run.micro_batch as usize;
        let size = recipe.data.train_size_px as usize;
        let seed = recipe.run.seed;
        let num_train = if opts.train_samples == 0 {
            train_split.len()
        } else {
            opts.train_samples.min(train_split.len())
        };
        let plan = PlanConfig {
            num_samples: num_train,
            seed,
            shuffle: true,
            repeats: recipe.augment.repeated_aug,
            // timm's RepeatAugSampler rounds the epoch down to a multiple of 256 samples; a data
            // set smaller than that would get an empty epoch, so tiny sets keep every sample.
            repeat_round: if num_train >= 256 { 256 } else { 0 },
            rank: rank as u32,
            world_size: world as u32,
            accum_steps: accum as u32,
            batch_size: micro,
            drop_last: true,
            split_batches: false,
        };
        let workers = workers_per_rank(recipe.run.workers, opts.local_world_size);
        let mut lcfg = LoaderConfig::new(train_transform(recipe)?, plan);
        lcfg.num_workers = workers;
        // The loader's buffers and the way batches reach the device (crate::backend).
        // The model's input statistics (timm's `default_cfg`): ImageNet's, 0.5 for a ViT.
        let norm = super::net_config(recipe, opts.model.as_ref())?.normalization();
        let feed = Feed::with_normalization(&opts.device, norm)?;
        let (buffers, upload) = crate::backend::upload(
            &opts.device,
            &feed,
            lcfg.num_buffers() + EXTRA_BUFFERS,
            lcfg.buffer_bytes(),
        )?;
        let loader =
            Loader::with_buffers(train_split.clone(), lcfg, buffers, rand_augment(recipe)?)?;
        let num_batches = loader.plan(0)?.num_batches();
        let updates_per_epoch = (num_batches / accum) as u64;
        if updates_per_epoch == 0 {
            return Err(TrainError::Data {
                path: opts.data_dir.clone(),
                message: format!(
                    "{num_train} training samples make {num_batches} micro-batches of {micro} on \
                     rank {rank} of {world}, fewer than one update of {accum}"
                ),
            });
        }

        // Model, optimizer, schedule, loss.
        let (varmap, mut model) =
            build_model(recipe, opts.model.as_ref(), num_classes, &opts.device)?;
        // The fast path by default: channels-last activations (bf16 with f32 master weights on
        // CUDA, f32 through the CPU kernels on the CPU).
        model.set_layout(opts.layout.unwrap_or(ActivationLayout::Nhwc));
        model.set_backward_mode(opts.backward);
        let init_line = match (&opts.init_from, opts.resume) {
            (Some(path), false) => Some(init_from(&varmap, path, rank, run_dir, num_classes)?),
            _ => None,
        };
        let ft = &recipe.finetune;
        let groups = scale_trunk_lr(
            param_groups(model.trainable_vars()?, recipe.optim.weight_decay),
            ft.trunk_lr_scale,
            finetune::is_head,
        );
        let optimizer = crate::backend::optimizer(recipe, groups, &opts.device)?;
        let trainable = model.trainable_vars()?;
        let (base_lr, lr_line) = recipe.resolved_lr(recipe.run.global_batch);
        let schedule = recipe.cosine_schedule(base_lr, updates_per_epoch);
        let total_epochs = (recipe.schedule.epochs + recipe.schedule.cooldown_epochs) as u64;

        let progress = match (rank, opts.progress) {
            (r, _) if r > 0 => Progress::Quiet,
            (_, Progress::Auto) if std::io::stderr().is_terminal() => Progress::Auto,
            (_, Progress::Auto) => Progress::Lines,
            (_, p) => p,
        };
        let mut t = Trainer {
            opts,
            comm,
            rank,
            world,
            ckpt_dir,
            hash,
            num_classes,
            accum,
            size,
            seed,
            num_batches,
            updates_per_epoch,
            total_epochs,
            total_steps: total_epochs * updates_per_epoch,
            feed,
            upload,
            val_split,
            val_transform: eval_transform(
                recipe.data.test_size_px,
                recipe.data.crop_pct,
                recipe.data.test_interpolation,
            )?,
            eval_workers: workers,
            varmap,
            model,
            optimizer,
            trainable,
            schedule,
            loss_fn: recipe.train_loss(),
            mix: mix_config(recipe),
            mixup: recipe.mixup_active(),
            step: 0,
            state: LoaderState {
                epoch: 0,
                next_batch: 0,
            },
            metrics: None,
            log: Log {
                progress,
                bar: None,
            },
            window: Window::new(),
            backward_logged: false,
            last_eval: None,
            t_start,
            stop_agreed: false,
            nonfinite: NonFiniteRun::default(),
            last_good_step: None,
        };
        if opts.resume {
            t.resume()?;
        } else if t.ckpt_dir.join("latest").exists() {
            return Err(TrainError::Unsupported(format!(
                "{}: holds the checkpoints of an earlier run: pass --resume to continue it, or \
                 choose another run directory",
                t.ckpt_dir.display()
            )));
        }
        t.check_same_weights()?;
        t.record_run(&lr_line)?;
        if let Some(line) = init_line {
            t.log.line(&line);
        }
        if norm != crate::feed::Normalization::IMAGENET {
            t.log.line(&format!(
                "input normalisation: mean {:?} std {:?} (timm's default_cfg of {})",
                norm.mean, norm.std, recipe.model.name
            ));
        }
        if ft.trunk_lr_scale != 1.0 {
            t.log.line(&format!(
                "fine-tuning: the trunk learns at {} x the classifier's rate",
                ft.trunk_lr_scale
            ));
        }
        if ft.freeze_trunk_epochs > 0 {
            t.log.line(&format!(
                "fine-tuning: the trunk is frozen for the first {} epoch(s); only the classifier \
                 learns",
                ft.freeze_trunk_epochs
            ));
        }
        if ft.bn_reestimate_batches > 0 && !opts.resume {
            let est = finetune::reestimate_bn(
                &t.model,
                &t.varmap,
                &t.feed,
                train_split,
                t.val_transform.clone(),
                (micro, workers, ft.bn_reestimate_batches as usize),
            )?;
            t.log.line(&format!(
                "fine-tuning: BatchNorm statistics of {} layers re-estimated over {} batches \
                 ({} training images, evaluation transform)",
                est.layers, est.batches, est.images
            ));
        }
        Ok((t, loader))
    }

    /// Loads the latest checkpoint: weights, optimizer state, step and loader position. A
    /// checkpoint written by another world size continues exactly when the update has the same
    /// micro-batches (always, since the recipe fixes `global_batch / micro_batch` and the plan
    /// deals them to virtual ranks): the loader position is converted to this world's
    /// micro-batch count.
    fn resume(&mut self) -> Result<()> {
        let ck = checkpoint::latest(&self.ckpt_dir)?;
        if ck.state.recipe_hash != self.hash {
            return Err(TrainError::RecipeMismatch {
                sidecar: ck.sidecar_path,
                found: ck.state.recipe_hash,
                expected: self.hash.clone(),
            });
        }
        checkpoint::load_weights(&self.varmap, &ck.weights_path)?;
        checkpoint::load_optimizer(
            self.optimizer.as_mut(),
            &ck.optimizer_path,
            &self.opts.device,
        )?;
        self.step = ck.state.step;
        let virtual_ranks = self.accum * self.world;
        let (w0, a0) = (
            ck.state.world_size.max(1) as usize,
            ck.state.accum_steps as usize,
        );
        // Checkpoints written before these fields existed came from one rank.
        let a0 = if a0 == 0 { virtual_ranks } else { a0 };
        if w0 * a0 != virtual_ranks {
            return Err(TrainError::Unsupported(format!(
                "{}: written by {w0} rank(s) x {a0} micro-batches per update, but this run has \
                 {} x {} = {virtual_ranks}: the updates would differ",
                ck.sidecar_path.display(),
                self.world,
                self.accum
            )));
        }
        let mut loader = ck.state.loader;
        if !loader.next_batch.is_multiple_of(a0) {
            return Err(TrainError::Unsupported(format!(
                "{}: the loader position {} is not at an update boundary of {a0} micro-batches",
                ck.sidecar_path.display(),
                loader.next_batch
            )));
        }
        loader.next_batch = loader.next_batch / a0 * self.accum;
        self.state = loader;
        let log_every = self.opts.recipe.run.log_every_steps;
        match ck.state.metrics_window {
            Some(w) => self.window.loss = w,
            None if loader.next_batch != 0 && !self.step.is_multiple_of(log_every) => {
                self.log.line(&format!(
                    "note: {} predates saved metrics windows: the first metrics line's loss \
                     averages only the updates after update {}",
                    ck.sidecar_path.display(),
                    self.step
                ));
            }
            None => {}
        }
        if w0 != self.world {
            self.log.line(&format!(
                "resuming a checkpoint of {w0} rank(s) with {}: the same updates ({virtual_ranks} \
                 micro-batches each); BatchNorm running statistics are rank 0's",
                self.world
            ));
        }
        Ok(())
    }

    /// Fails every rank when the ranks' weights differ (they start from the same seed or the
    /// same checkpoint), naming the ranks that differ from rank 0.
    fn check_same_weights(&mut self) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let mut h = Sha256::new();
        for (name, v) in &self.trainable {
            h.update(name.as_bytes());
            let t = v.as_tensor().to_dtype(DType::F32)?.flatten_all()?;
            for x in t.to_vec1::<f32>()? {
                h.update(x.to_le_bytes());
            }
        }
        let ours = h.finalize().to_vec();
        let mut root = ours.clone();
        self.comm.broadcast_bytes(0, &mut root)?;
        let mut differs = vec![0f64; self.world];
        differs[self.rank] = (root != ours) as u8 as f64;
        self.comm.all_reduce_f64(&mut differs)?;
        let bad: Vec<usize> = (0..self.world).filter(|&r| differs[r] != 0.0).collect();
        if !bad.is_empty() {
            return Err(TrainError::Unsupported(format!(
                "initial weights of rank(s) {bad:?} differ from rank 0's (checked by checksum)"
            )));
        }
        Ok(())
    }

    /// Rank 0 writes `recipe.toml`, opens the metrics file and logs the run's set-up.
    fn record_run(&mut self, lr_line: &str) -> Result<()> {
        let opts = self.opts;
        let recipe = &opts.recipe;
        if self.rank == 0 {
            let run_dir = &opts.run_dir;
            let recipe_path = run_dir.join("recipe.toml");
            let text = recipe
                .to_toml_string()
                .map_err(|e| TrainError::Recipe(vec![e.to_string()]))?;
            std::fs::write(&recipe_path, text).map_err(io_err(&recipe_path))?;
            let path = run_dir.join("metrics.jsonl");
            if opts.resume {
                // Lines written after the checkpoint (by a run killed before its next one) are
                // written again by this run.
                truncate_metrics(&path, self.step)?;
            } else if path.exists() {
                // A fresh run (an earlier one stopped before its first checkpoint).
                std::fs::remove_file(&path).map_err(io_err(&path))?;
            }
            self.metrics = Some(MetricsWriter::append(&path).map_err(io_err(&path))?);
        }
        if self.log.progress == Progress::Auto {
            let bar = ProgressBar::new(self.total_steps);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta}]",
                )
                .expect("valid template"),
            );
            bar.set_position(self.step);
            self.log.bar = Some(bar);
        }
        let micro = recipe.run.micro_batch;
        self.log.line(&format!(
            "run {}: {} ({} classes), {} train / {} val samples, {} updates/epoch x {} epochs, \
             micro-batch {micro} x {} accumulated x {} rank(s)",
            opts.run_dir.display(),
            opts.model
                .as_ref()
                .map_or(recipe.model.name.clone(), |_| "custom model".into()),
            self.num_classes,
            self.num_batches * micro as usize * self.world,
            self.val_split.len(),
            self.updates_per_epoch,
            self.total_epochs,
            self.accum,
            self.world,
        ));
        self.log.line(lr_line);
        if let Some(base) = &opts.base {
            match recipe.diff(base) {
                Ok(d) if d.is_empty() => self.log.line("recipe: as the preset"),
                Ok(d) => self.log.line(&format!(
                    "recipe differs from the preset:\n  {}",
                    d.join("\n  ")
                )),
                Err(e) => self.log.line(&format!("recipe diff failed: {e}")),
            }
        }
        for note in recipe.unverified_notes() {
            self.log.line(&format!("note: {note}"));
        }
        #[cfg(feature = "cuda")]
        if opts.device.is_cuda() {
            crate::cuda::conv::set_deterministic(opts.deterministic);
            self.log.line(if opts.deterministic {
                "cuDNN: the fastest deterministic algorithm per convolution (--deterministic)"
            } else {
                "cuDNN: the fastest algorithm per convolution (--deterministic for bit-identical reruns)"
            });
        }
        if opts.resume {
            self.log.line(&format!(
                "resumed at update {} (epoch {}, micro-batch {})",
                self.step, self.state.epoch, self.state.next_batch
            ));
        }
        Ok(())
    }

    /// Runs the schedule from the current position to its end (or `max_steps`).
    pub fn run(&mut self, loader: &mut Loader<DynStorage>) -> Result<TrainSummary> {
        let mut interrupted = false;
        let mut stopped_by = None;
        // Set-up is not timed; a resumed window keeps its losses.
        self.window.restart_clock();
        'epochs: for epoch in self.state.epoch..self.total_epochs {
            let start = if epoch == self.state.epoch {
                self.state
            } else {
                LoaderState {
                    epoch,
                    next_batch: 0,
                }
            };
            let first_update = (start.next_batch / self.accum) as u64;
            let mut cursor = EpochCursor {
                run: loader.resume(start)?,
                epoch,
                fetched: start.next_batch,
                end_batch: self.updates_per_epoch as usize * self.accum,
                ahead: None,
            };
            debug_assert_eq!(
                self.upload.pending(),
                0,
                "no upload left over from the last epoch"
            );
            for u in first_update..self.updates_per_epoch {
                if self.opts.max_steps.is_some_and(|m| self.step >= m) {
                    interrupted = true;
                    break 'epochs;
                }
                self.update(&mut cursor, u)?;
                if let Some(bar) = &self.log.bar {
                    bar.set_position(self.step);
                }
                let every = self.opts.recipe.run.log_every_steps;
                if self.step.is_multiple_of(every) || u + 1 == self.updates_per_epoch {
                    self.write_metrics(epoch)?;
                }
                let every = self.opts.recipe.run.checkpoint_every_steps;
                // The cursor counts the prefetched micro-batch: resume after the update.
                let at = LoaderState {
                    epoch,
                    next_batch: (u as usize + 1) * self.accum,
                };
                let mid_epoch = u + 1 < self.updates_per_epoch;
                let periodic = every > 0 && self.step.is_multiple_of(every) && mid_epoch;
                if periodic {
                    self.save_checkpoint(at)?;
                }
                self.check_divergence()?;
                if mid_epoch && self.stop_requested() {
                    if !periodic {
                        self.save_checkpoint(at)?;
                        self.check_divergence()?;
                    }
                    stopped_by = Some(self.write_stop_line(epoch)?);
                    break 'epochs;
                }
            }
            drop(cursor);
            let last = epoch + 1 == self.total_epochs;
            let every = self.opts.recipe.run.eval_every_epochs as u64;
            if (epoch + 1) % every == 0 || last {
                self.evaluate_and_log(epoch)?;
            }
            self.save_checkpoint(LoaderState {
                epoch: epoch + 1,
                next_batch: 0,
            })?;
            self.check_divergence()?;
            if !last && self.stop_requested() {
                stopped_by = Some(self.write_stop_line(epoch)?);
                break 'epochs;
            }
        }
        if let Some(bar) = &self.log.bar {
            bar.finish();
        }
        Ok(TrainSummary {
            steps: self.step,
            updates_per_epoch: self.updates_per_epoch,
            last_eval: self.last_eval,
            interrupted,
            wall_s: self.t_start.elapsed().as_secs_f64(),
            stopped_by,
        })
    }

    /// Whether to stop after this update: this process's request on one rank; with several
    /// ranks, what they agreed at the last metrics line (so that all stop after the same one).
    fn stop_requested(&self) -> bool {
        if self.world == 1 {
            self.opts.stop.requested().is_some()
        } else {
            self.stop_agreed
        }
    }

    /// After a stop's checkpoint: a metrics line saying why the run stopped and where it can
    /// continue, and the log line. Returns the reason.
    fn write_stop_line(&mut self, epoch: u64) -> Result<String> {
        let reason = match self.opts.stop.requested() {
            Some(signal) => super::stop::signal_name(signal),
            None => "a stop request on another rank".to_string(),
        };
        let checkpoint = format!("step-{}", self.step);
        if let Some(metrics) = &mut self.metrics {
            metrics
                .write(&json!({
                    "epoch": epoch, "step": self.step, "stopped": reason,
                    "checkpoint": checkpoint, "world_size": self.world,
                }))
                .map_err(io_err(metrics.path()))?;
        }
        self.log.line(&format!(
            "stopped by {reason} after update {}: checkpoint {checkpoint} written; continue \
             with --resume",
            self.step
        ));
        Ok(reason)
    }

    /// Fails with [`TrainError::Diverged`] once `max_nonfinite_updates` consecutive updates had
    /// a non-finite loss, pointing `latest` back at the last checkpoint written before them.
    fn check_divergence(&mut self) -> Result<()> {
        let max = self.opts.max_nonfinite_updates;
        if max == 0 || self.nonfinite.count < max {
            return Ok(());
        }
        let checkpoint = match self.last_good_step {
            Some(step) => {
                if self.rank == 0 {
                    checkpoint::point_latest(&self.ckpt_dir, step)?;
                }
                format!(
                    "checkpoints/latest names step-{step}, the last checkpoint before them \
                     (lower the learning rate or check the data, then start again or --resume)"
                )
            }
            None => "no checkpoint was written before them".to_string(),
        };
        Err(TrainError::Diverged {
            count: self.nonfinite.count,
            first: self.nonfinite.first,
            last: self.nonfinite.first + self.nonfinite.count - 1,
            checkpoint,
        })
    }

    /// The global micro-batch id of this rank's `batch_id` (the id a one-rank run gives the same
    /// micro-batch): this rank's micro-batch `a` of update `s` is virtual rank `rank * A + a`.
    fn global_batch_id(&self, batch_id: usize) -> usize {
        let (s, a) = (batch_id / self.accum, batch_id % self.accum);
        (s * self.world + self.rank) * self.accum + a
    }

    /// Takes the next micro-batch from the loader, draws its Mixup/CutMix (keyed by its global
    /// id, so the draw does not depend on the world size) and starts its upload.
    fn stage_next(&mut self, cursor: &mut EpochCursor<'_>) -> Result<Staged> {
        let t_wait = Instant::now();
        let next = cursor.run.next();
        self.window.wait_s += t_wait.elapsed().as_secs_f64();
        let mut batch = next.ok_or_else(|| {
            TrainError::Unsupported(format!(
                "epoch {}: the loader ended at micro-batch {} (plan of {} micro-batches)",
                cursor.epoch,
                cursor.run.state().next_batch,
                self.num_batches
            ))
        })??;
        let draw = if self.mixup {
            self.mix.draw(
                self.seed,
                cursor.epoch,
                self.global_batch_id(batch.batch_id) as u64,
                self.size,
                self.size,
            )
        } else {
            MixDraw {
                lam: 1.0,
                kind: MixKind::None,
            }
        };
        let labels = std::mem::take(&mut batch.labels);
        let len = batch.len;
        self.upload.start(batch, &draw)?;
        self.window.wait_s += self.upload.take_wait_s();
        Ok(Staged {
            len,
            labels,
            lam: draw.lam,
        })
    }

    /// One optimizer update: this rank's `A` micro-batches forward and backward (the loss of
    /// each divided by the `W x A` micro-batches of the update), the gradients summed over the
    /// ranks, and the optimizer step queued.
    fn update(&mut self, cursor: &mut EpochCursor<'_>, u: u64) -> Result<()> {
        let lr = self.schedule.lr_at(self.step, self.updates_per_epoch);
        let mut grads = Some(GradAccumulator::new(&self.trainable));
        let mut store = None;
        // The micro-batch losses stay on the device (summed in f64) and are read only when a
        // metrics line or a checkpoint needs them: no host sync per micro-batch.
        let mut losses = TreeSum::new();
        let last_update =
            u + 1 == self.updates_per_epoch || self.opts.max_steps == Some(self.step + 1);
        let total = self.accum * self.world;
        for a in 0..self.accum {
            let cur = match cursor.ahead.take() {
                Some(cur) => cur,
                None => {
                    cursor.fetched += 1;
                    self.stage_next(cursor)?
                }
            };
            let xs = self.upload.next_images(self.model.layout())?;
            let n = cur.len;
            let dense;
            let label_t;
            let targets = if self.mixup {
                dense = self.feed.targets(
                    &mixed_targets(
                        &cur.labels,
                        self.num_classes,
                        cur.lam,
                        self.opts.recipe.augment.smoothing,
                    ),
                    n,
                    self.num_classes,
                )?;
                Targets::Dense(&dense)
            } else {
                label_t = self.feed.labels(&cur.labels)?;
                Targets::Classes(&label_t)
            };
            // Keyed by the virtual rank, as the one-rank run keys this micro-batch.
            let v = (self.rank * self.accum + a) as u64;
            let dp_seed =
                loader::rng::derive(self.seed, &[DROP_PATH_TAG, cursor.epoch, self.step, v]);
            let (logits, pass) = self.model.forward_train_pass(&xs, dp_seed)?;
            if !self.backward_logged {
                self.backward_logged = true;
                self.log.line(if pass.is_explicit() {
                    "backward: explicit (channels-last trunk), classifier and loss by autograd"
                } else {
                    "backward: candle's autograd graph"
                });
            }
            let loss = self.loss_fn.forward(&logits, targets)?;
            let scaled = if total > 1 {
                (&loss / total as f64)?
            } else {
                loss.clone()
            };
            let acc = grads.as_mut().expect("taken at the last micro-batch only");
            if a + 1 == self.accum && self.world > 1 {
                // The last micro-batch: its gradients are reduced over the ranks in buckets
                // that start as the backward finishes their layers.
                let acc = grads.take().expect("present");
                let mut reducer = BucketReducer::new(acc, &mut *self.comm, self.opts.bucket_bytes);
                let rest = pass.backward_hooked(&scaled, &mut |g| {
                    reducer.ready(g).map_err(candle_core::Error::wrap)
                })?;
                store = Some(reducer.finish(rest)?);
            } else {
                acc.add(pass.backward(&scaled)?)?;
            }
            // While the device works through this micro-batch, take the next one from the
            // loader and start its copy (on CUDA it overlaps this step's compute).
            if cursor.fetched < cursor.end_batch && !(last_update && a + 1 == self.accum) {
                cursor.fetched += 1;
                cursor.ahead = Some(self.stage_next(cursor)?);
            }
            losses.push(loss.detach().to_dtype(DType::F64)?, |x: Tensor, y| x + y)?;
            self.window.images += n as u64;
        }
        let mut store = match (store, grads) {
            (Some(s), _) => s,
            (None, Some(acc)) => acc.into_store()?,
            (None, None) => unreachable!("the accumulator is taken only with a store"),
        };
        if cursor.epoch < self.opts.recipe.finetune.freeze_trunk_epochs as u64 {
            finetune::drop_trunk_grads(&mut store, &self.trainable);
        }
        // Queued, not waited for: on a GPU the report is read only for a metrics line.
        self.optimizer.queue_step(&store, lr)?;
        self.step += 1;
        let loss = losses.finish(|x: Tensor, y| x + y)?;
        self.window
            .pending
            .push(loss.expect("an update has at least one micro-batch"));
        Ok(())
    }

    /// Reads this rank's unread update losses (one transfer), sums each over the ranks together
    /// with `extra` (one collective, which every rank joins) and adds them to the window. Returns
    /// the reduced `extra`.
    fn reduce_window_losses(&mut self, extra: &[f64]) -> Result<Vec<f64>> {
        let pending = std::mem::take(&mut self.window.pending);
        let mut sums = if pending.is_empty() {
            Vec::new()
        } else {
            Tensor::stack(&pending, 0)?.to_vec1::<f64>()?
        };
        let n = sums.len();
        sums.extend_from_slice(extra);
        if !sums.is_empty() {
            self.comm.all_reduce_f64(&mut sums)?;
        }
        let micro_batches = (self.accum * self.world) as f64;
        let losses: Vec<f64> = sums[..n].iter().map(|s| s / micro_batches).collect();
        // The losses of updates step - n + 1 ..= step, in order.
        for (i, l) in losses.iter().enumerate() {
            if l.is_finite() {
                self.nonfinite = NonFiniteRun::default();
            } else {
                if self.nonfinite.count == 0 {
                    self.nonfinite.first = self.step - n as u64 + 1 + i as u64;
                }
                self.nonfinite.count += 1;
            }
        }
        self.window.add_losses(&losses);
        Ok(sums.split_off(n))
    }

    /// A metrics line (rank 0 writes it; every rank takes part in the sums): the mean loss of
    /// the window's updates (`loss`; each update's loss is the mean over all its micro-batches)
    /// and the last update's (`loss_last`), the learning rate, the gradient norm, images per
    /// second over all ranks, and the mean fraction of the window the ranks waited for data.
    fn write_metrics(&mut self, epoch: u64) -> Result<()> {
        let report = self
            .optimizer
            .last_report()?
            .expect("an update was queued just before");
        let asked = self.opts.stop.requested().is_some() as u8 as f64;
        let reduced = self.reduce_window_losses(&[self.window.wait_s, asked])?;
        let wait = reduced[0] / self.world as f64;
        self.stop_agreed = reduced[1] > 0.0;
        let (loss, loss_last) = (self.window.mean_loss(), self.window.loss_last);
        let dt = self.window.start.elapsed().as_secs_f64().max(1e-9);
        let images_per_s = (self.window.images * self.world as u64) as f64 / dt;
        let lr = self.schedule.lr_at(self.step - 1, self.updates_per_epoch);
        if let Some(metrics) = &mut self.metrics {
            let line = json!({
                "epoch": epoch, "step": self.step, "loss": loss, "loss_last": loss_last, "lr": lr,
                "grad_norm": report.grad_norm, "applied": report.applied,
                "images_per_s": images_per_s,
                "data_wait_s": wait, "loader_wait_frac": wait / dt,
                "world_size": self.world,
            });
            metrics.write(&line).map_err(io_err(metrics.path()))?;
        }
        let msg = format!(
            "epoch {epoch} step {}/{} loss {loss:.4} (last {loss_last:.4}) lr {lr:.3e} \
             {images_per_s:.1} img/s data wait {:.0}%",
            self.step,
            self.total_steps,
            100.0 * wait / dt
        );
        match &self.log.bar {
            Some(bar) => bar.set_message(msg),
            None => self.log.line(&msg),
        }
        self.window = Window::new();
        Ok(())
    }

    /// Evaluates on the validation split (shared by the ranks) and logs the result.
    pub fn evaluate_and_log(&mut self, epoch: u64) -> Result<EvalResult> {
        let t = Instant::now();
        let r = evaluate_rank(
            &self.model,
            &self.feed,
            self.val_split.clone(),
            self.val_transform.clone(),
            self.opts.recipe.run.micro_batch as usize,
            self.eval_workers,
            self.opts.val_samples,
            &mut *self.comm,
        )?;
        let eval_s = t.elapsed().as_secs_f64();
        if let Some(metrics) = &mut self.metrics {
            metrics
                .write(&json!({
                    "epoch": epoch, "step": self.step, "top1": r.top1, "top5": r.top5,
                    "val_loss": r.loss, "val_samples": r.samples, "eval_s": eval_s,
                    "world_size": self.world, "rss_bytes": crate::metrics::resident_bytes(),
                }))
                .map_err(io_err(metrics.path()))?;
        }
        self.log.line(&format!(
            "epoch {epoch} eval: top1 {:.2} top5 {:.2} val loss {:.4} ({} images, {eval_s:.1} s)",
            r.top1, r.top5, r.loss, r.samples
        ));
        self.last_eval = Some(r);
        self.window = Window::new();
        Ok(r)
    }

    /// Rank 0 writes a checkpoint at loader position `at` (weights, optimizer state, run state
    /// with this world's size and accumulation); every rank waits until it is on disk.
    pub fn save_checkpoint(&mut self, at: LoaderState) -> Result<()> {
        // The open metrics window's losses so far (a collective when updates are unread).
        self.reduce_window_losses(&[])?;
        if self.rank == 0 {
            checkpoint::save(
                &self.ckpt_dir,
                &self.varmap,
                self.optimizer.as_ref(),
                RunState {
                    format_version: checkpoint::FORMAT_VERSION,
                    step: self.step,
                    epoch: at.epoch,
                    loader: at,
                    seed: self.seed,
                    recipe_hash: self.hash.clone(),
                    weights: String::new(),
                    optimizer: String::new(),
                    world_size: self.world as u32,
                    accum_steps: self.accum as u32,
                    metrics_window: Some(self.window.loss),
                },
            )?;
            checkpoint::prune(&self.ckpt_dir, self.opts.keep_checkpoints)?;
        }
        if self.nonfinite.count == 0 {
            self.last_good_step = Some(self.step);
        }
        self.comm.barrier()?;
        Ok(())
    }
}

/// Loader workers of one rank: `run.workers`, or the machine's cores shared by the ranks on it.
fn workers_per_rank(configured: u32, local_world_size: usize) -> usize {
    if configured == 0 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / local_world_size.max(1)).max(1)
    } else {
        configured as usize
    }
}

/// Loads the weights of a fine-tuning run's start (see [`TrainOptions::init_from`]): every tensor
/// but a classifier of another class count, which keeps its fresh init (timm's). Rank 0 records
/// the file, its SHA-256 and what was replaced in `run_dir/init-from.json`. Returns the log line.
fn init_from(
    varmap: &candle_nn::VarMap,
    path: &Path,
    rank: usize,
    run_dir: &Path,
    num_classes: usize,
) -> Result<String> {
    let replaced = checkpoint::load_weights_replacing(varmap, path, &checkpoint::CLASSIFIER)?;
    if rank == 0 {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        let sha: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let record = json!({
            "init_from": path.display().to_string(), "sha256": sha,
            "replaced": replaced, "num_classes": num_classes,
        });
        let out = run_dir.join("init-from.json");
        let text = serde_json::to_string_pretty(&record).expect("JSON value serialises");
        std::fs::write(&out, text).map_err(io_err(&out))?;
    }
    Ok(if replaced.is_empty() {
        format!(
            "initialised from {} (every tensor, the classifier included)",
            path.display()
        )
    } else {
        format!(
            "initialised from {}: the trunk; {} re-initialised for {num_classes} classes (timm's \
             init)",
            path.display(),
            replaced.join(", ")
        )
    })
}

/// Keeps the lines of `path` up to the first that is not a complete JSON object with a `step`
/// at most `step` (the lines of the updates a checkpoint at `step` includes: every line of a
/// step is written before its checkpoint, and a killed run leaves at most one partial line, its
/// last). Written to a temporary file and renamed, so the file is whole whenever it is read.
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mut keep = 0;
    for line in text.split_inclusive('\n') {
        let within = line.ends_with('\n')
            && serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64))
                .is_some_and(|s| s <= step);
        if !within {
            break;
        }
        keep += line.len();
    }
    if keep == text.len() {
        return Ok(());
    }
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, &text.as_bytes()[..keep]).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}
