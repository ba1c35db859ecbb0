//! The training loop: a [`Recipe`] run on a shard set, with evaluation, metrics, checkpoints
//! and exact resume, on one rank or as one rank of many ([`Trainer`], [`train_rank`],
//! [`train_threads`]).
//!
//! Per optimizer update (timm v0.5.4 `train_one_epoch`, with gradient accumulation and data
//! parallelism):
//!
//! 1. `V = recipe.accumulation_steps()` micro-batches of `run.micro_batch` images make an
//!    update; with W ranks each rank takes `A = V / W` of them. The loader's plan treats them as
//!    V virtual ranks, rank r's micro-batch a being virtual rank `r * A + a` (so
//!    repeated-augmentation copies never share a BatchNorm batch; timm-semantics §2.8).
//! 2. Each micro-batch is mixed on the host, on its u8 images, exactly as timm's
//!    `FastCollateMixup` (one draw per micro-batch keyed by `(seed, epoch, global micro-batch
//!    index in the epoch)`), and gets dense targets (`mixed_targets`) when mixup/cutmix is on.
//! 3. [`Feed`] normalises it on the device; `forward_train_pass` runs with a drop-path seed
//!    derived from `(seed, epoch, step, virtual rank)` (on CUDA its backward is the explicit one,
//!    see `ResNet::forward_train_pass`); the loss is divided by V and its gradients are summed
//!    over the rank's micro-batches, then over the ranks ([`crate::dist`]).
//! 4. The optimizer steps with the schedule's rate for the update index.
//!
//! Everything is a function of the recipe and the data, so a run resumed from a checkpoint
//! continues bit for bit as the uninterrupted run would have (on one device and thread count),
//! and W ranks compute what one rank computes (see [`crate::dist`] for the exact statement;
//! BatchNorm running statistics are per rank).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device};
use candle_nn::VarMap;
use loader::mix::MixConfig;
use loader::rand_augment::{RandAugment, RandAugmentConfig};
use loader::transform::{Interpolation as LoaderInterp, RrcConfig, TrainInterpolation};
use loader::{Augment, Transform};
use sha2::{Digest, Sha256};
use shards::Split;

use crate::dist::{Collective, SingleRank, ThreadGroup};
use crate::model::{BackwardMode, NetConfig, ResNet};
use crate::recipe::{Interpolation, Recipe};

mod eval;
pub mod finetune;
mod grads;
pub mod real;
pub mod stop;
mod trainer;

pub use eval::{eval_images, eval_loader, evaluate, evaluate_rank, evaluate_with, EvalOptions};
pub use grads::{all_reduce as all_reduce_gradients, BucketReducer, GradAccumulator, BUCKET_BYTES};
pub use trainer::Trainer;

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
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
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
    /// A collective or the rendezvous failed (another rank's error is named with its rank).
    #[error("{0}")]
    Dist(#[from] crate::dist::DistError),
    /// The loss stayed non-finite for too many consecutive updates.
    #[error(
        "the loss was not finite for {count} consecutive updates (updates {first} to {last}): \
         the run diverged and stopped; {checkpoint}"
    )]
    Diverged {
        /// Consecutive non-finite updates.
        count: u64,
        /// The first of them (1-based update number).
        first: u64,
        /// The last of them.
        last: u64,
        /// What became of the checkpoints (the last one before the divergence is `latest`).
        checkpoint: String,
    },
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
    pub model: Option<NetConfig>,
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
    /// Ranks on this machine (loader workers default to the cores divided by it).
    pub local_world_size: usize,
    /// How long a rank waits for the others in a collective before failing (ranks as threads).
    pub dist_timeout: Duration,
    /// Bytes of gradients per all-reduce bucket (default [`BUCKET_BYTES`], 25 MiB).
    pub bucket_bytes: usize,
    /// The activation layout (`None`: channels-last, the fast path on CUDA and on the CPU;
    /// `Nchw` runs candle's own ops).
    pub layout: Option<crate::model::ActivationLayout>,
    /// Where the run looks for a stop request ([`stop`]; default: never).
    pub stop: stop::StopSource,
    /// Fine-tuning: a new run starts from these weights (ours, or timm's `.pth`/safetensors)
    /// instead of a random init; the classifier is re-initialised when the class count differs
    /// ([`crate::checkpoint::load_weights_replacing`]). Ignored on `resume` (the checkpoint has
    /// the weights). Recorded in `run_dir/init-from.json`.
    pub init_from: Option<PathBuf>,
    /// Checkpoints kept in `checkpoints/`: the newest N (0: all); older ones are deleted after
    /// each new one is complete. `latest` is always among them.
    pub keep_checkpoints: usize,
    /// Stop with [`TrainError::Diverged`] when this many consecutive updates have a non-finite
    /// loss (0: never). A shorter run of them is skipped by the optimizer and counted.
    pub max_nonfinite_updates: u64,
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
            local_world_size: 1,
            dist_timeout: Duration::from_secs(600),
            bucket_bytes: BUCKET_BYTES,
            layout: None,
            stop: stop::StopSource::Never,
            init_from: None,
            keep_checkpoints: 0,
            max_nonfinite_updates: 0,
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
    /// ImageNet-ReaL scores, when evaluated with ReaL labels.
    pub real: Option<RealScores>,
}

/// ImageNet-ReaL top-1 and top-5 (see [`real`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RealScores {
    /// Top-1 in percent over the images with a non-empty label list.
    pub top1: f64,
    /// Top-5 in percent over the same images.
    pub top5: f64,
    /// Images counted (those with a non-empty list).
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
    /// The signal that stopped the run early (after a checkpoint), if one did.
    pub stopped_by: Option<String>,
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

/// Builds the network of a recipe (or `model`) for `num_classes` classes, freshly initialised
/// from the run seed, with its tensors in a new `VarMap`.
pub fn build_model(
    recipe: &Recipe,
    model: Option<&(impl Clone + Into<NetConfig>)>,
    num_classes: usize,
    device: &Device,
) -> Result<(VarMap, ResNet)> {
    let cfg = net_config(recipe, model)?;
    build_sized(
        recipe,
        cfg,
        num_classes,
        device,
        recipe.data.train_size_px as usize,
    )
}

/// The network a run trains: `model` when given, else the recipe's `model.name` (timm's
/// configuration of that name).
pub fn net_config(
    recipe: &Recipe,
    model: Option<&(impl Clone + Into<NetConfig>)>,
) -> Result<NetConfig> {
    Ok(match model {
        Some(c) => c.clone().into(),
        None => NetConfig::by_name(&recipe.model.name)?,
    })
}

/// `cfg` with the recipe's class count and drop path, laid out for `img_px` input, initialised
/// from the recipe's seed.
fn build_sized(
    recipe: &Recipe,
    cfg: NetConfig,
    num_classes: usize,
    device: &Device,
    img_px: usize,
) -> Result<(VarMap, ResNet)> {
    let cfg = cfg
        .with_num_classes(num_classes)
        .with_drop_path_rate(recipe.model.drop_path_rate)
        .with_img_size(img_px);
    let varmap = VarMap::new();
    let net = cfg.build_seeded(&varmap, recipe.run.seed, DType::F32, device)?;
    Ok((varmap, net))
}

/// [`build_model`] for evaluating the weights in `weights`: a Vision Transformer is built for
/// the position-embedding grid the file stores (whatever the recipe's training size), so that
/// the embedding is resampled once, in the forward, to each evaluation size, as timm resamples
/// once at load for its model built at the test size. Other networks are [`build_model`]'s.
pub fn build_model_for_weights(
    recipe: &Recipe,
    model: Option<&NetConfig>,
    num_classes: usize,
    device: &Device,
    weights: &Path,
) -> Result<(VarMap, ResNet)> {
    let cfg = net_config(recipe, model)?;
    let mut img_px = recipe.data.train_size_px as usize;
    if let NetConfig::Vit(v) = &cfg {
        if let Some(g) = crate::checkpoint::stored_grid(weights)? {
            img_px = g * v.patch_size;
        }
    }
    build_sized(recipe, cfg, num_classes, device, img_px)
}

/// Runs the recipe on one rank: trains, evaluates every `run.eval_every_epochs` epochs and at the
/// end, writes metrics and checkpoints under `opts.run_dir`.
pub fn train(opts: &TrainOptions) -> Result<TrainSummary> {
    train_rank(opts, &mut SingleRank)
}

/// Runs the recipe as rank `comm.rank()` of `comm.world_size()`: every rank calls this with the
/// same options (rank 0 writes the run directory). On an error the other ranks are told (their
/// next collective fails with this rank's reason) before it is returned.
pub fn train_rank(opts: &TrainOptions, comm: &mut dyn Collective) -> Result<TrainSummary> {
    let r = Trainer::new(opts, &mut *comm).and_then(|(mut t, mut loader)| t.run(&mut loader));
    if let Err(e) = &r {
        comm.abort(&e.to_string());
    }
    r
}

/// Runs the recipe on `nproc` ranks as threads of this process (`train --nproc-per-node N
/// --device cpu`), reducing through a [`ThreadGroup`]: the same loop as on GPUs above the
/// collective. Returns rank 0's summary, or the first failing rank's error with its rank.
pub fn train_threads(opts: &TrainOptions, nproc: usize) -> Result<TrainSummary> {
    if nproc <= 1 {
        return train(opts);
    }
    if !matches!(opts.device, Device::Cpu) {
        return Err(TrainError::Unsupported(
            "ranks as threads run on the CPU only; on GPUs each rank is a process (the launcher \
             of `train --nproc-per-node`)"
                .into(),
        ));
    }
    let groups = ThreadGroup::new(nproc, opts.dist_timeout);
    let results: Vec<Result<TrainSummary>> = std::thread::scope(|s| {
        let handles: Vec<_> = groups
            .into_iter()
            .map(|mut g| {
                let mut o = opts.clone();
                o.local_world_size = nproc;
                s.spawn(move || train_rank(&o, &mut g))
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| {
                h.join().unwrap_or_else(|_| {
                    Err(TrainError::Unsupported(format!("rank {rank} panicked")))
                })
            })
            .collect()
    });
    // The root cause: a rank's own error, not another rank's report of it.
    let mut first_peer = None;
    for (rank, r) in results.iter().enumerate() {
        match r {
            Err(TrainError::Dist(crate::dist::DistError::PeerFailed { .. })) => {
                first_peer.get_or_insert(rank);
            }
            Err(e) => return Err(TrainError::Unsupported(format!("rank {rank}: {e}"))),
            Ok(_) => {}
        }
    }
    if let Some(rank) = first_peer {
        let e = results.into_iter().nth(rank).expect("exists").unwrap_err();
        return Err(TrainError::Unsupported(format!("rank {rank}: {e}")));
    }
    results.into_iter().next().expect("rank 0")
}
