//! The training loop: a [`Recipe`] run on a shard set, with evaluation, metrics, checkpoints
//! and exact resume.
//!
//! Per optimizer update (timm v0.5.4 `train_one_epoch`, with gradient accumulation):
//!
//! 1. `A = recipe.accumulation_steps()` micro-batches of `run.micro_batch` images come from the
//!    loader, whose plan treats the A micro-batches as A virtual ranks (so repeated-augmentation
//!    copies never share a BatchNorm batch; timm-semantics §2.8).
//! 2. Each micro-batch is mixed on the host, on its u8 images, exactly as timm's
//!    `FastCollateMixup` (one draw per micro-batch keyed by `(seed, epoch, micro-batch index in
//!    the epoch)`), and gets dense targets (`mixed_targets`) when mixup/cutmix is on.
//! 3. [`Feed`] normalises it on the device; `forward_train_pass` runs with a drop-path seed
//!    derived from `(seed, epoch, step, micro-batch)` (on CUDA its backward is the explicit one,
//!    see `ResNet::forward_train_pass`); the loss is divided by A and its gradients are summed
//!    over the micro-batches.
//! 4. The optimizer steps with the schedule's rate for the update index.
//!
//! Everything is a function of the recipe and the data, so a run resumed from a checkpoint
//! continues bit for bit as the uninterrupted run would have (on one device and thread count).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, TensorId, Var};
use candle_nn::VarMap;
use indicatif::{ProgressBar, ProgressStyle};
use loader::mix::{mixed_targets, MixConfig, MixDraw, MixKind};
use loader::rand_augment::{RandAugment, RandAugmentConfig};
use loader::transform::{Interpolation as LoaderInterp, RrcConfig, TrainInterpolation};
use loader::{Augment, EpochRun, Loader, LoaderConfig, LoaderState, PlanConfig, Transform};
use serde_json::json;
use sha2::{Digest, Sha256};
use shards::Split;

use crate::checkpoint::{self, RunState};
use crate::feed::Feed;
use crate::loss::Targets;
use crate::metrics::{topk_correct, MetricsWriter};
use crate::model::{ActivationLayout, BackwardMode, ResNet, ResNetConfig};
use crate::optim::{lamb_for_device, param_groups, Sgd, TrainOptimizer};
use crate::recipe::{Interpolation, OptimizerKind, Recipe};
use crate::transfer::{device_upload, DynStorage, Upload, EXTRA_BUFFERS};

/// Errors of a training or evaluation run. Messages name the file or setting involved.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The recipe failed validation (every problem listed).
    #[error("invalid recipe:\n  {}", .0.join("\n  "))]
    Recipe(Vec<String>),
    /// A setting this trainer does not support.
    #[error("{0}")]
    Unsupported(String),
    /// The shard set could not be opened.
    #[error("data {path}: {message}")]
    Data {
        /// The shard directory.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A file of the run directory could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The loader failed.
    #[error("loader: {0}")]
    Loader(#[from] loader::Error),
    /// A tensor operation failed.
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
    /// The optimizer failed.
    #[error("optimizer: {0}")]
    Optim(#[from] crate::optim::OptimError),
    /// A checkpoint could not be written or read.
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] checkpoint::CheckpointError),
    /// A resume found a checkpoint of another recipe.
    #[error("{sidecar}: checkpoint of recipe {found}, but this run's recipe hashes to {expected}; resume with the run's recipe.toml")]
    RecipeMismatch {
        /// The checkpoint sidecar.
        sidecar: PathBuf,
        /// The hash in the checkpoint.
        found: String,
        /// The hash of this run's recipe.
        expected: String,
    },
    /// The model could not be selected.
    #[error("model: {0}")]
    Model(#[from] crate::model::ModelError),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, TrainError>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// A bar when stderr is a terminal, log lines otherwise.
    Auto,
    /// Log lines on stderr every `run.log_every_steps` updates.
    Lines,
    /// Nothing on stderr (metrics are still written).
    Quiet,
}

/// Everything a training run needs besides the recipe.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// The resolved recipe.
    pub recipe: Recipe,
    /// The recipe it was derived from (a preset), to log the differences; `None` skips the diff.
    pub base: Option<Recipe>,
    /// Shard set directory (`manifest.json`, `train/`, `val/`).
    pub data_dir: PathBuf,
    /// Run directory: `recipe.toml`, `metrics.jsonl`, `checkpoints/`.
    pub run_dir: PathBuf,
    /// Compute device.
    pub device: Device,
    /// Continue from `run_dir/checkpoints/latest`.
    pub resume: bool,
    /// Network to use instead of `recipe.model.name` (tests use smaller ones). Its class count
    /// and drop-path rate are still set from the recipe and the data.
    pub model: Option<ResNetConfig>,
    /// Stop after this many optimizer updates in all (an interruption, for tests); the last
    /// periodic checkpoint is what a resume starts from.
    pub max_steps: Option<u64>,
    /// Use only the first N training samples (0 = all).
    pub train_samples: u64,
    /// Use only the first N validation samples (0 = all).
    pub val_samples: u64,
    /// Progress display.
    pub progress: Progress,
    /// How gradients are computed (`Auto`: the explicit trunk backward on CUDA; `Graph` is the
    /// fallback through candle's autograd).
    pub backward: BackwardMode,
    /// CUDA: take the fastest *deterministic* cuDNN algorithm of each convolution, so a rerun is
    /// bit-identical (default off: the fastest algorithm, some of which sum with atomics, so
    /// reruns may differ in the last bits). Without effect on the CPU, which is deterministic.
    pub deterministic: bool,
}

impl TrainOptions {
    /// Options with the defaults: CPU, no resume, the recipe's model, whole splits, automatic
    /// progress.
    pub fn new(recipe: Recipe, data_dir: impl Into<PathBuf>, run_dir: impl Into<PathBuf>) -> Self {
        TrainOptions {
            recipe,
            base: None,
            data_dir: data_dir.into(),
            run_dir: run_dir.into(),
            device: Device::Cpu,
            resume: false,
            model: None,
            max_steps: None,
            train_samples: 0,
            val_samples: 0,
            progress: Progress::Auto,
            backward: BackwardMode::Auto,
            deterministic: false,
        }
    }
}

/// Validation results.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalResult {
    /// Top-1 accuracy in percent.
    pub top1: f64,
    /// Top-5 accuracy in percent.
    pub top5: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Images evaluated.
    pub samples: u64,
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    /// Optimizer updates done in all (including before a resume).
    pub steps: u64,
    /// Optimizer updates per epoch.
    pub updates_per_epoch: u64,
    /// The last evaluation, if any.
    pub last_eval: Option<EvalResult>,
    /// Whether the run stopped at `max_steps` before the end of the schedule.
    pub interrupted: bool,
    /// Wall time of this invocation in seconds.
    pub wall_s: f64,
}

/// SHA-256 (hex) of a recipe's TOML text.
pub fn recipe_hash(recipe: &Recipe) -> Result<String> {
    let text = recipe
        .to_toml_string()
        .map_err(|e| TrainError::Recipe(vec![e.to_string()]))?;
    Ok(Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The train transform of a recipe (RandomResizedCrop at `data.train_size_px`, flip 0.5).
pub fn train_transform(recipe: &Recipe) -> Result<Transform> {
    if recipe.augment.hflip != 0.5 {
        return Err(TrainError::Unsupported(format!(
            "augment.hflip = {}: the loader flips with probability 0.5 only",
            recipe.augment.hflip
        )));
    }
    Ok(Transform::Train {
        size: recipe.data.train_size_px,
        rrc: RrcConfig::default(),
        interpolation: train_interpolation(recipe.data.train_interpolation),
    })
}

fn train_interpolation(i: Interpolation) -> TrainInterpolation {
    match i {
        Interpolation::Bilinear => TrainInterpolation::Bilinear,
        Interpolation::Bicubic => TrainInterpolation::Bicubic,
        Interpolation::Random => TrainInterpolation::Random,
    }
}

/// The eval transform at `size` px with `crop_pct` (resize the shorter side to
/// `floor(size / crop_pct)`, centre crop).
pub fn eval_transform(size: u32, crop_pct: f64, interpolation: Interpolation) -> Result<Transform> {
    let interpolation = match interpolation {
        Interpolation::Bilinear => LoaderInterp::Bilinear,
        Interpolation::Bicubic => LoaderInterp::Bicubic,
        Interpolation::Random => {
            return Err(TrainError::Unsupported(
                "data.test_interpolation = random: evaluation needs bilinear or bicubic".into(),
            ))
        }
    };
    Ok(Transform::Eval {
        size,
        crop_pct,
        interpolation,
    })
}

/// The recipe's Mixup/CutMix settings (timm batch mode).
pub fn mix_config(recipe: &Recipe) -> MixConfig {
    MixConfig {
        mixup_alpha: recipe.augment.mixup_alpha,
        cutmix_alpha: recipe.augment.cutmix_alpha,
        mix_prob: recipe.augment.mix_prob,
        switch_prob: recipe.augment.switch_prob,
        label_smoothing: recipe.augment.smoothing,
    }
}

/// The recipe's RandAugment (with the train interpolation for its geometric ops), or `None`
/// when `augment.rand_augment` is empty.
pub fn rand_augment(recipe: &Recipe) -> Result<Option<Arc<dyn Augment>>> {
    if recipe.augment.rand_augment.is_empty() {
        return Ok(None);
    }
    let mut cfg = RandAugmentConfig::parse(&recipe.augment.rand_augment)
        .map_err(|e| TrainError::Recipe(vec![format!("augment.rand_augment: {e}")]))?;
    cfg.interpolation = train_interpolation(recipe.data.train_interpolation);
    Ok(Some(Arc::new(RandAugment::new(cfg))))
}

/// Opens a split of the shard set at `dir`.
pub fn open_split(dir: &Path, name: &str) -> Result<(Arc<Split>, usize)> {
    let data = |message: String| TrainError::Data {
        path: dir.to_path_buf(),
        message,
    };
    let ds = shards::Dataset::open(dir).map_err(|e| data(e.to_string()))?;
    let split = ds
        .split(name)
        .map_err(|e| data(format!("split {name:?}: {e}")))?;
    if split.is_empty() {
        return Err(data(format!("split {name:?} is empty")));
    }
    Ok((Arc::new(split), ds.num_classes()))
}

fn workers(n: u32) -> usize {
    if n == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        n as usize
    }
}

/// Evaluates `model` on `split` (in index order) with `transform`: top-1, top-5 and mean
/// cross-entropy, as timm's `validate`.
pub fn evaluate(
    model: &ResNet,
    feed: &Feed,
    split: Arc<Split>,
    transform: Transform,
    batch_size: usize,
    num_workers: usize,
    num_samples: u64,
) -> Result<EvalResult> {
    let size = transform.size() as usize;
    let mut plan = PlanConfig::new(num_samples, batch_size);
    plan.shuffle = false;
    let mut cfg = LoaderConfig::new(transform, plan);
    cfg.num_workers = num_workers;
    let mut loader = Loader::new(split, cfg)?;
    let (mut n, mut c1, mut c5, mut loss_sum) = (0u64, 0u64, 0u64, 0f64);
    for batch in loader.epoch(0)? {
        let batch = batch?;
        if batch.len == 0 {
            continue;
        }
        let xs = feed.images_for(batch.images(), batch.len, size, model.layout())?;
        let logits = model.forward_eval(&xs)?;
        let labels = feed.labels(&batch.labels)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?.to_scalar::<f32>()?;
        loss_sum += loss as f64 * batch.len as f64;
        let c = topk_correct(&logits, &batch.labels, &[1, 5])?;
        c1 += c[0];
        c5 += c[1];
        n += batch.len as u64;
    }
    let pct = |c: u64| 100.0 * c as f64 / n.max(1) as f64;
    Ok(EvalResult {
        top1: pct(c1),
        top5: pct(c5),
        loss: loss_sum / n.max(1) as f64,
        samples: n,
    })
}

/// Builds the network of a recipe (or `model`) for `num_classes` classes, freshly initialised
/// from the run seed, with its tensors in a new `VarMap`.
pub fn build_model(
    recipe: &Recipe,
    model: Option<&ResNetConfig>,
    num_classes: usize,
    device: &Device,
) -> Result<(VarMap, ResNet)> {
    let cfg = match model {
        Some(c) => c.clone(),
        None => ResNetConfig::by_name(&recipe.model.name)?,
    }
    .with_num_classes(num_classes)
    .with_drop_path_rate(recipe.model.drop_path_rate);
    let varmap = VarMap::new();
    let net = cfg.build_seeded(&varmap, recipe.run.seed, DType::F32, device)?;
    Ok((varmap, net))
}

/// Sums the gradients of the trainable variables over micro-batches, keeping nothing else of
/// each backward pass (the activations' gradients are dropped as soon as a micro-batch is done).
///
/// With each micro-batch loss divided by the number of micro-batches, the sum is the gradient of
/// the mean loss over the whole batch (exactly so for a network without BatchNorm).
pub struct GradAccumulator {
    vars: Vec<Var>,
    sums: HashMap<TensorId, Tensor>,
}

impl GradAccumulator {
    /// An empty sum over `vars`.
    pub fn new(vars: &[(String, Var)]) -> Self {
        GradAccumulator {
            vars: vars.iter().map(|(_, v)| v.clone()).collect(),
            sums: HashMap::new(),
        }
    }

    /// Adds one backward pass's gradients of the variables (in a fixed order: deterministic).
    pub fn add(&mut self, mut grads: GradStore) -> candle_core::Result<()> {
        for var in &self.vars {
            if let Some(g) = grads.remove(var.as_tensor()) {
                let id = var.as_tensor().id();
                let sum = match self.sums.remove(&id) {
                    Some(prev) => (prev + g)?,
                    None => g,
                };
                self.sums.insert(id, sum);
            }
        }
        Ok(())
    }

    /// The sums as a gradient store for [`TrainOptimizer::step`].
    pub fn into_store(self) -> GradStore {
        let mut store = GradStore::default();
        for (id, g) in self.sums {
            store.insert_id(id, g);
        }
        store
    }
}

/// What the training loop needs to stage a micro-batch.
struct StageCtx {
    mix: MixConfig,
    mixup: bool,
    seed: u64,
    size: usize,
    num_batches: usize,
}

/// A micro-batch whose copy to the device has started; its images come from
/// [`Upload::next_images`], in order.
struct Staged {
    len: usize,
    labels: Vec<u32>,
    lam: f64,
}

/// Takes the next micro-batch from the loader, draws its Mixup/CutMix and starts its upload.
/// Adds the time blocked on the loader and on copy completion to `wait_s`.
fn stage_next(
    run: &mut EpochRun<'_, DynStorage>,
    upload: &mut dyn Upload,
    ctx: &StageCtx,
    epoch: u64,
    wait_s: &mut f64,
) -> Result<Staged> {
    let t_wait = Instant::now();
    let next = run.next();
    *wait_s += t_wait.elapsed().as_secs_f64();
    let mut batch = next.ok_or_else(|| {
        TrainError::Unsupported(format!(
            "epoch {epoch}: the loader ended at micro-batch {} (plan of {} micro-batches)",
            run.state().next_batch,
            ctx.num_batches
        ))
    })??;
    let draw = if ctx.mixup {
        ctx.mix
            .draw(ctx.seed, epoch, batch.batch_id as u64, ctx.size, ctx.size)
    } else {
        MixDraw {
            lam: 1.0,
            kind: MixKind::None,
        }
    };
    let labels = std::mem::take(&mut batch.labels);
    let len = batch.len;
    upload.start(batch, &draw)?;
    *wait_s += upload.take_wait_s();
    Ok(Staged {
        len,
        labels,
        lam: draw.lam,
    })
}

/// Tags that keep the run's random streams apart.
const DROP_PATH_TAG: u64 = 0x4452_4f50;

struct Log {
    progress: Progress,
    bar: Option<ProgressBar>,
}

impl Log {
    fn line(&self, text: &str) {
        match (&self.bar, self.progress) {
            (_, Progress::Quiet) => {}
            (Some(bar), _) => bar.println(text),
            (None, _) => eprintln!("{text}"),
        }
    }
}

/// Runs the recipe: trains, evaluates every `run.eval_every_epochs` epochs and at the end,
/// writes metrics and checkpoints under `opts.run_dir`.
pub fn train(opts: &TrainOptions) -> Result<TrainSummary> {
    let t_start = Instant::now();
    let recipe = &opts.recipe;
    recipe
        .validate()
        .map_err(|errs| TrainError::Recipe(errs.iter().map(|e| e.to_string()).collect()))?;
    if recipe.run.micro_batch < 2 {
        return Err(TrainError::Unsupported(
            "run.micro_batch must be at least 2 (BatchNorm needs more than one value)".into(),
        ));
    }
    let run_dir = &opts.run_dir;
    let ckpt_dir = run_dir.join("checkpoints");
    std::fs::create_dir_all(&ckpt_dir).map_err(io_err(&ckpt_dir))?;
    let hash = recipe_hash(recipe)?;

    // Data.
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
    let accum = recipe.accumulation_steps() as usize;
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
        // timm's RepeatAugSampler rounds the epoch down to a multiple of 256 samples; a data set
        // smaller than that would get an empty epoch, so tiny sets keep every sample.
        repeat_round: if num_train >= 256 { 256 } else { 0 },
        rank: 0,
        world_size: 1,
        accum_steps: accum as u32,
        batch_size: micro,
        drop_last: true,
    };
    let mut lcfg = LoaderConfig::new(train_transform(recipe)?, plan);
    lcfg.num_workers = workers(recipe.run.workers);
    // The loader's buffers and the way batches reach the device: page-locked buffers and
    // asynchronous copies on CUDA, heap buffers and a synchronous feed on the CPU.
    let feed = Feed::new(&opts.device)?;
    let (buffers, mut upload) = device_upload(
        &opts.device,
        &feed,
        lcfg.num_buffers() + EXTRA_BUFFERS,
        lcfg.buffer_bytes(),
    )?;
    let mut loader = Loader::with_buffers(train_split, lcfg, buffers, rand_augment(recipe)?)?;
    let num_batches = loader.plan(0)?.num_batches();
    let updates_per_epoch = (num_batches / accum) as u64;
    if updates_per_epoch == 0 {
        return Err(TrainError::Data {
            path: opts.data_dir.clone(),
            message: format!(
                "{num_train} training samples make {num_batches} micro-batches of {micro}, fewer than one update of {accum}"
            ),
        });
    }

    // Model, optimizer, schedule, loss.
    let (varmap, mut model) = build_model(recipe, opts.model.as_ref(), num_classes, &opts.device)?;
    if opts.device.is_cuda() {
        // The fast path: channels-last bf16 activations, f32 master weights.
        model.set_layout(ActivationLayout::Nhwc);
    }
    model.set_backward_mode(opts.backward);
    let groups = param_groups(model.trainable_vars()?, recipe.optim.weight_decay);
    let mut optimizer: Box<dyn TrainOptimizer> = match recipe.optim.name {
        OptimizerKind::Lamb => lamb_for_device(groups, recipe.lamb_config(), &opts.device)?,
        OptimizerKind::Sgd => Box::new(Sgd::new(groups, recipe.sgd_config())?),
    };
    let trainable = model.trainable_vars()?;
    let (base_lr, lr_line) = recipe.resolved_lr(recipe.run.global_batch);
    let schedule = recipe.cosine_schedule(base_lr, updates_per_epoch);
    let loss_fn = recipe.train_loss();
    let mix = mix_config(recipe);
    let mixup = recipe.mixup_active();
    let stage = StageCtx {
        mix,
        mixup,
        seed,
        size,
        num_batches,
    };
    let total_epochs = (recipe.schedule.epochs + recipe.schedule.cooldown_epochs) as u64;
    let total_steps = total_epochs * updates_per_epoch;

    // Start or resume.
    let mut step = 0u64;
    let mut state = LoaderState {
        epoch: 0,
        next_batch: 0,
    };
    if opts.resume {
        let ck = checkpoint::latest(&ckpt_dir)?;
        if ck.state.recipe_hash != hash {
            return Err(TrainError::RecipeMismatch {
                sidecar: ck.sidecar_path,
                found: ck.state.recipe_hash,
                expected: hash,
            });
        }
        checkpoint::load_weights(&varmap, &ck.weights_path)?;
        checkpoint::load_optimizer(optimizer.as_mut(), &ck.optimizer_path, &opts.device)?;
        step = ck.state.step;
        state = ck.state.loader;
    }

    // Record the run.
    let recipe_path = run_dir.join("recipe.toml");
    let text = recipe
        .to_toml_string()
        .map_err(|e| TrainError::Recipe(vec![e.to_string()]))?;
    std::fs::write(&recipe_path, text).map_err(io_err(&recipe_path))?;
    let mut metrics = MetricsWriter::append(&run_dir.join("metrics.jsonl"))
        .map_err(io_err(&run_dir.join("metrics.jsonl")))?;
    let progress = match opts.progress {
        Progress::Auto if std::io::stderr().is_terminal() => Progress::Auto,
        Progress::Auto => Progress::Lines,
        p => p,
    };
    let bar = (progress == Progress::Auto).then(|| {
        let bar = ProgressBar::new(total_steps);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta}]")
                .expect("valid template"),
        );
        bar.set_position(step);
        bar
    });
    let log = Log { progress, bar };
    let mut backward_logged = false;
    log.line(&format!(
        "run {}: {} ({} classes), {} train / {} val samples, {updates_per_epoch} updates/epoch x {total_epochs} epochs, micro-batch {micro} x {accum} accumulated",
        run_dir.display(),
        opts.model.as_ref().map_or(recipe.model.name.clone(), |_| "custom model".into()),
        num_classes,
        num_train,
        val_split.len(),
    ));
    log.line(&lr_line);
    if let Some(base) = &opts.base {
        match recipe.diff(base) {
            Ok(d) if d.is_empty() => log.line("recipe: as the preset"),
            Ok(d) => log.line(&format!(
                "recipe differs from the preset:\n  {}",
                d.join("\n  ")
            )),
            Err(e) => log.line(&format!("recipe diff failed: {e}")),
        }
    }
    for note in recipe.unverified_notes() {
        log.line(&format!("note: {note}"));
    }
    #[cfg(feature = "cuda")]
    if opts.device.is_cuda() {
        crate::cuda::conv::set_deterministic(opts.deterministic);
        log.line(if opts.deterministic {
            "cuDNN: the fastest deterministic algorithm per convolution (--deterministic)"
        } else {
            "cuDNN: the fastest algorithm per convolution (--deterministic for bit-identical reruns)"
        });
    }
    if opts.resume {
        log.line(&format!(
            "resumed at update {step} (epoch {}, micro-batch {})",
            state.epoch, state.next_batch
        ));
    }

    let val_transform = eval_transform(
        recipe.data.test_size_px,
        recipe.data.crop_pct,
        recipe.data.test_interpolation,
    )?;
    let eval_workers = workers(recipe.run.workers);
    let mut last_eval = None;
    let mut interrupted = false;
    let (mut win_start, mut win_wait, mut win_images) = (Instant::now(), 0f64, 0u64);
    let save = |step: u64, loader_state: LoaderState, optimizer: &dyn TrainOptimizer| {
        checkpoint::save(
            &ckpt_dir,
            &varmap,
            optimizer,
            RunState {
                format_version: checkpoint::FORMAT_VERSION,
                step,
                epoch: loader_state.epoch,
                loader: loader_state,
                seed,
                recipe_hash: hash.clone(),
                weights: String::new(),
                optimizer: String::new(),
            },
        )
    };

    'epochs: for epoch in state.epoch..total_epochs {
        let start = if epoch == state.epoch {
            state
        } else {
            LoaderState {
                epoch,
                next_batch: 0,
            }
        };
        let first_update = start.next_batch as u64 / accum as u64;
        let mut run = loader.resume(start)?;
        // The micro-batches this epoch uses end here (a remainder of fewer than `accum` is
        // left out); `fetched` counts those taken from the loader, one ahead of the step.
        let end_batch = updates_per_epoch as usize * accum;
        let mut fetched = start.next_batch;
        let mut ahead: Option<Staged> = None;
        debug_assert_eq!(
            upload.pending(),
            0,
            "no upload left over from the last epoch"
        );
        for u in first_update..updates_per_epoch {
            if opts.max_steps.is_some_and(|m| step >= m) {
                interrupted = true;
                break 'epochs;
            }
            let lr = schedule.lr_at(step, updates_per_epoch);
            let mut grads = GradAccumulator::new(&trainable);
            // The micro-batch losses stay on the device (summed in f64, as the host did) and are
            // read only when a metrics line needs them: no host sync per micro-batch.
            let mut loss_sum: Option<Tensor> = None;
            let last_update = u + 1 == updates_per_epoch || opts.max_steps == Some(step + 1);
            for a in 0..accum {
                let cur = match ahead.take() {
                    Some(cur) => cur,
                    None => {
                        fetched += 1;
                        stage_next(&mut run, upload.as_mut(), &stage, epoch, &mut win_wait)?
                    }
                };
                let xs = upload.next_images(model.layout())?;
                let n = cur.len;
                let dense;
                let label_t;
                let targets = if mixup {
                    dense = feed.targets(
                        &mixed_targets(&cur.labels, num_classes, cur.lam, recipe.augment.smoothing),
                        n,
                        num_classes,
                    )?;
                    Targets::Dense(&dense)
                } else {
                    label_t = feed.labels(&cur.labels)?;
                    Targets::Classes(&label_t)
                };
                let dp_seed = loader::rng::derive(seed, &[DROP_PATH_TAG, epoch, step, a as u64]);
                let (logits, pass) = model.forward_train_pass(&xs, dp_seed)?;
                if !backward_logged {
                    backward_logged = true;
                    log.line(if pass.is_explicit() {
                        "backward: explicit (channels-last trunk), classifier and loss by autograd"
                    } else {
                        "backward: candle's autograd graph"
                    });
                }
                let loss = loss_fn.forward(&logits, targets)?;
                let scaled = if accum > 1 {
                    (&loss / accum as f64)?
                } else {
                    loss.clone()
                };
                grads.add(pass.backward(&scaled)?)?;
                // While the device works through this micro-batch, take the next one from the
                // loader and start its copy (on CUDA it overlaps this step's compute).
                if fetched < end_batch && !(last_update && a + 1 == accum) {
                    fetched += 1;
                    ahead = Some(stage_next(
                        &mut run,
                        upload.as_mut(),
                        &stage,
                        epoch,
                        &mut win_wait,
                    )?);
                }
                let l = loss.detach().to_dtype(DType::F64)?;
                loss_sum = Some(match loss_sum {
                    None => l,
                    Some(sum) => (sum + l)?,
                });
                win_images += n as u64;
            }
            // Queued, not waited for: on a GPU the report is read only for a metrics line.
            optimizer.queue_step(&grads.into_store(), lr)?;
            step += 1;
            if let Some(bar) = &log.bar {
                bar.set_position(step);
            }
            if step.is_multiple_of(recipe.run.log_every_steps) || u + 1 == updates_per_epoch {
                let loss = match &loss_sum {
                    Some(sum) => sum.to_scalar::<f64>()? / accum as f64,
                    None => f64::NAN,
                };
                let report = optimizer
                    .last_report()?
                    .expect("an update was queued just before");
                let dt = win_start.elapsed().as_secs_f64().max(1e-9);
                let line = json!({
                    "epoch": epoch, "step": step, "loss": loss, "lr": lr,
                    "grad_norm": report.grad_norm, "applied": report.applied,
                    "images_per_s": win_images as f64 / dt,
                    "data_wait_s": win_wait, "loader_wait_frac": win_wait / dt,
                });
                metrics.write(&line).map_err(io_err(metrics.path()))?;
                let msg = format!(
                    "epoch {epoch} step {step}/{total_steps} loss {loss:.4} lr {lr:.3e} {:.1} img/s data wait {:.0}%",
                    win_images as f64 / dt,
                    100.0 * win_wait / dt
                );
                match &log.bar {
                    Some(bar) => bar.set_message(msg),
                    None => log.line(&msg),
                }
                (win_start, win_wait, win_images) = (Instant::now(), 0.0, 0);
            }
            let every = recipe.run.checkpoint_every_steps;
            if every > 0 && step.is_multiple_of(every) && u + 1 < updates_per_epoch {
                // The run's own state counts the prefetched micro-batch: resume after the update.
                let state = LoaderState {
                    epoch,
                    next_batch: (u as usize + 1) * accum,
                };
                save(step, state, optimizer.as_ref())?;
            }
        }
        drop(ahead);
        drop(run);
        let last = epoch + 1 == total_epochs;
        if (epoch + 1) % recipe.run.eval_every_epochs as u64 == 0 || last {
            let t = Instant::now();
            let r = evaluate(
                &model,
                &feed,
                val_split.clone(),
                val_transform.clone(),
                micro,
                eval_workers,
                opts.val_samples,
            )?;
            let eval_s = t.elapsed().as_secs_f64();
            metrics
                .write(&json!({
                    "epoch": epoch, "step": step, "top1": r.top1, "top5": r.top5,
                    "val_loss": r.loss, "val_samples": r.samples, "eval_s": eval_s,
                }))
                .map_err(io_err(metrics.path()))?;
            log.line(&format!(
                "epoch {epoch} eval: top1 {:.2} top5 {:.2} val loss {:.4} ({} images, {eval_s:.1} s)",
                r.top1, r.top5, r.loss, r.samples
            ));
            last_eval = Some(r);
            win_start = Instant::now();
        }
        save(
            step,
            LoaderState {
                epoch: epoch + 1,
                next_batch: 0,
            },
            optimizer.as_ref(),
        )?;
    }
    if let Some(bar) = &log.bar {
        bar.finish();
    }
    Ok(TrainSummary {
        steps: step,
        updates_per_epoch,
        last_eval,
        interrupted,
        wall_s: t_start.elapsed().as_secs_f64(),
    })
}
