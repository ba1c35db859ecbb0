//! `train`: runs an RSB recipe on a shard set, or evaluates a checkpoint.
//!
//! ```text
//! train --recipe a1|a2|a3|ft|FILE.toml --data SHARDS --out RUN_DIR [--config PARTIAL.toml]
//!       [--model NAME] [--device cpu|cuda:N] [--epochs E] [--batch-size B] [--micro-batch M]
//!       [--size PX] [--set key=value ...] [--resume] [--workers N] [--backward auto|graph|explicit]
//!       [--layout nhwc|nchw] [--deterministic] [--nproc-per-node N] [--dist-timeout S]
//!       [--init-from WEIGHTS] [--trunk-lr-scale F] [--freeze-trunk-epochs N]
//!       [--bn-reestimate-batches N] [--keep-checkpoints N] [--max-nonfinite-updates K]
//! train --eval-only --checkpoint PATH --data SHARDS --size PX --crop-pct C [--model NAME]
//! ```
//!
//! Precedence: recipe (preset or complete file) < `--config` (partial TOML) < typed flags <
//! `--set`. Exit codes: 0 success, 2 error (one line with its causes on stderr), 75 stopped by
//! SIGTERM or SIGINT after writing a checkpoint (`--resume` continues; a second signal exits at
//! once with 128 + the signal's number).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::json;
use std::time::Duration;
use trainer::model::ActivationLayout;

use tools::ranks;
use trainer::dist::RankInfo;
use trainer::recipe::{Interpolation, Recipe};
use trainer::train::{self, Progress, TrainOptions};

#[derive(Parser, Debug)]
#[command(
    name = "train",
    about = "Train an RSB recipe on a shard set, or evaluate a checkpoint"
)]
struct Args {
    /// Preset (a1, a2, a3; ft for fine-tuning) or a complete recipe file (such as a run's
    /// recipe.toml).
    #[arg(long, default_value = "a1")]
    recipe: String,
    /// A partial recipe (TOML) merged over --recipe.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Shard set directory (manifest.json, train/, val/).
    #[arg(long)]
    data: PathBuf,
    /// Run directory (recipe.toml, metrics.jsonl, checkpoints/).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Model name (timm), e.g. resnet50 = model.name.
    #[arg(long)]
    model: Option<String>,
    /// Take the model's data settings from timm 0.5.4's default_cfg (data.train_size_px =
    /// input_size, data.test_size_px = test_input_size, data.crop_pct, data.test_interpolation),
    /// as timm's train.py does without --img-size; --size and --set still override them.
    #[arg(long)]
    model_data: bool,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// schedule.epochs.
    #[arg(long)]
    epochs: Option<u32>,
    /// Global batch (run.global_batch).
    #[arg(long)]
    batch_size: Option<u32>,
    /// Device batch (run.micro_batch).
    #[arg(long)]
    micro_batch: Option<u32>,
    /// Train size in px (data.train_size_px); with --eval-only, the test size.
    #[arg(long)]
    size: Option<u32>,
    /// Recipe overrides, e.g. --set optim.lr=4e-3 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Continue from RUN_DIR/checkpoints/latest.
    #[arg(long)]
    resume: bool,
    /// Backward: auto = the explicit trunk backward on the fast path (channels-last, CUDA or
    /// CPU), candle's graph elsewhere; graph is the fallback (slower and larger, same results up
    /// to rounding).
    #[arg(long, default_value = "auto")]
    backward: trainer::model::BackwardMode,
    /// Activation layout: nhwc (default), the fast path (cuDNN and our kernels on CUDA, the CPU
    /// kernels of trainer::ops::cpu on the CPU); nchw, candle's own ops.
    #[arg(long)]
    layout: Option<ActivationLayout>,
    /// CUDA: the fastest deterministic cuDNN algorithm per convolution, for bit-identical
    /// reruns (default: the fastest algorithm).
    #[arg(long)]
    deterministic: bool,
    /// Loader worker threads (run.workers; 0 = all cores).
    #[arg(long)]
    workers: Option<u32>,
    /// Use only the first N training samples (0 = all).
    #[arg(long, default_value_t = 0)]
    train_samples: u64,
    /// Use only the first N validation samples (0 = all).
    #[arg(long, default_value_t = 0)]
    val_samples: u64,
    /// Evaluate --checkpoint instead of training.
    #[arg(long)]
    eval_only: bool,
    /// Weights (safetensors, timm names) for --eval-only.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Centre-crop fraction for --eval-only.
    #[arg(long, default_value_t = 0.95)]
    crop_pct: f64,
    /// Eval interpolation for --eval-only (bilinear or bicubic).
    #[arg(long, default_value = "bicubic")]
    interpolation: String,
    /// Log lines instead of a progress bar.
    #[arg(long)]
    no_bar: bool,
    /// Ranks on this machine: N ranks as threads of this process with `--device cpu`; N worker
    /// processes, one per GPU (cuda:0..N-1, NCCL), with `--device cuda`.
    #[arg(long)]
    nproc_per_node: Option<usize>,
    /// Seconds a rank waits for the others (rendezvous, and any collective) before it stops
    /// with an error naming what is missing.
    #[arg(long, default_value_t = 300)]
    dist_timeout: u64,
    /// Fine-tuning: start a new run from these weights (a checkpoint of ours, or timm's .pth or
    /// safetensors); the classifier is re-initialised when the class count differs.
    #[arg(long, value_name = "WEIGHTS")]
    init_from: Option<PathBuf>,
    /// Fine-tuning: the trunk's learning rate as a fraction of the classifier's
    /// (finetune.trunk_lr_scale; 1 = one rate).
    #[arg(long, value_name = "F")]
    trunk_lr_scale: Option<f64>,
    /// Fine-tuning: only the classifier learns for the first N epochs
    /// (finetune.freeze_trunk_epochs).
    #[arg(long, value_name = "N")]
    freeze_trunk_epochs: Option<u32>,
    /// Fine-tuning: re-estimate the BatchNorm statistics on N batches of the new training set
    /// before the first update (finetune.bn_reestimate_batches; 0 = keep the checkpoint's).
    #[arg(long, value_name = "N")]
    bn_reestimate_batches: Option<u32>,
    /// Checkpoints to keep: the newest N (0 = all); older ones are deleted as new ones complete.
    #[arg(long, default_value_t = 3)]
    keep_checkpoints: usize,
    /// Stop (exit code 2, `latest` back at the last checkpoint before them) after this many
    /// consecutive updates with a non-finite loss (0 = never); fewer are skipped and counted.
    #[arg(long, default_value_t = 20)]
    max_nonfinite_updates: u64,
}

fn main() {
    tools::alloc::tune();
    if let Err(e) = run(Args::parse()) {
        eprintln!("train: error: {e:#}");
        std::process::exit(2);
    }
}

fn load_recipe(args: &Args) -> Result<(Recipe, Option<Recipe>)> {
    let (mut recipe, base) = if Recipe::PRESETS.contains(&args.recipe.as_str()) {
        let r = Recipe::preset(&args.recipe)?;
        (r.clone(), Some(r))
    } else {
        let path = Path::new(&args.recipe);
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "--recipe {}: not a preset ({}) and not a readable recipe file",
                path.display(),
                Recipe::PRESETS.join(", ")
            )
        })?;
        let r = Recipe::from_toml_str(&text)
            .with_context(|| format!("reading recipe file {}", path.display()))?;
        (r, None)
    };
    if let Some(cfg) = &args.config {
        let text = std::fs::read_to_string(cfg)
            .with_context(|| format!("reading config {}", cfg.display()))?;
        recipe = recipe
            .merged_with_toml_str(&text, &cfg.display().to_string())
            .with_context(|| format!("merging config {}", cfg.display()))?;
    }
    if let Some(m) = &args.model {
        recipe.model.name = m.clone();
    }
    if args.model_data {
        let Some(cfg) = trainer::model::timm_data_cfg(&recipe.model.name) else {
            bail!(
                "--model-data: no timm data settings for model {:?}; known models: {}",
                recipe.model.name,
                trainer::model::model_names().join(", ")
            )
        };
        cfg.apply(&mut recipe.data);
    }
    if let Some(e) = args.epochs {
        recipe.schedule.epochs = e;
    }
    if let Some(b) = args.batch_size {
        recipe.run.global_batch = b;
    }
    if let Some(m) = args.micro_batch {
        recipe.run.micro_batch = m;
    }
    if let Some(s) = args.size {
        recipe.data.train_size_px = s;
    }
    if let Some(w) = args.workers {
        recipe.run.workers = w;
    }
    if let Some(f) = args.trunk_lr_scale {
        recipe.finetune.trunk_lr_scale = f;
    }
    if let Some(n) = args.freeze_trunk_epochs {
        recipe.finetune.freeze_trunk_epochs = n;
    }
    if let Some(n) = args.bn_reestimate_batches {
        recipe.finetune.bn_reestimate_batches = n;
    }
    let recipe = recipe.with_overrides(&args.set)?;
    if let Err(errs) = recipe.validate() {
        let lines: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        bail!("invalid recipe:\n  {}", lines.join("\n  "));
    }
    Ok((recipe, base))
}

fn eval_only(args: &Args) -> Result<()> {
    let ckpt = args
        .checkpoint
        .as_ref()
        .context("--eval-only needs --checkpoint PATH (a .safetensors with timm names)")?;
    let size = args.size.context("--eval-only needs --size PX")?;
    let interpolation = match args.interpolation.as_str() {
        "bilinear" => Interpolation::Bilinear,
        "bicubic" => Interpolation::Bicubic,
        other => bail!("--interpolation {other:?}: expected bilinear or bicubic"),
    };
    let dev = tools::bench::parse_device(&args.device)?;
    let (recipe, _) = load_recipe(args)?;
    let (val, classes) = train::open_split(&args.data, "val")?;
    let (varmap, mut model) = train::build_model_for_weights(&recipe, None, classes, &dev, ckpt)?;
    model.set_layout(args.layout.unwrap_or(ActivationLayout::Nhwc));
    trainer::checkpoint::load_weights(&varmap, ckpt)
        .with_context(|| format!("loading {} into {}", ckpt.display(), recipe.model.name))?;
    let transform = train::eval_transform(size, args.crop_pct, interpolation)?;
    let feed = trainer::feed::Feed::with_normalization(&dev, model.config().normalization())?;
    let batch = args.batch_size.unwrap_or(64).max(1) as usize;
    let workers = match args.workers.unwrap_or(0) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n as usize,
    };
    let r = train::evaluate(
        &model,
        &feed,
        val,
        transform,
        batch,
        workers,
        args.val_samples,
    )?;
    println!(
        "{}",
        json!({
            "checkpoint": ckpt.display().to_string(), "model": recipe.model.name,
            "size": size, "crop_pct": args.crop_pct, "interpolation": args.interpolation,
            "top1": r.top1, "top5": r.top5, "val_loss": r.loss, "samples": r.samples,
        })
    );
    Ok(())
}

fn run(args: Args) -> Result<()> {
    if args.eval_only {
        return eval_only(&args);
    }
    let out = args
        .out
        .clone()
        .context("--out RUN_DIR is required for training")?;
    // SIGTERM / SIGINT: finish the update, checkpoint, exit 75 (a second one exits at once).
    train::stop::install_signal_handlers().context("installing the SIGTERM/SIGINT handlers")?;
    let rank = RankInfo::from_env().context("reading this rank from the environment")?;
    if let Some(info) = rank.filter(|i| i.world_size > 1) {
        if args.nproc_per_node.is_some() {
            bail!(
                "--nproc-per-node in a worker: RANK/WORLD_SIZE (or Slurm's SLURM_PROCID/SLURM_NTASKS) \
                 are already set, so this process is one rank of {}; start one process per GPU \
                 without --nproc-per-node",
                info.world_size
            );
        }
        return worker(&args, &out, &info);
    }
    let nproc = args.nproc_per_node.unwrap_or(1);
    if nproc > 1 && (args.device != "cpu" || std::env::var_os(ranks::TEST_VAR).is_some()) {
        return ranks::launch_self(nproc);
    }
    let dev = tools::bench::parse_device(&args.device)?;
    let (recipe, base) = load_recipe(&args)?;
    let mut opts = options(&args, recipe, base, &out, dev);
    if nproc > 1 {
        opts.local_world_size = nproc;
        eprintln!("train: {nproc} ranks as threads on the CPU");
    }
    let s = train::train_threads(&opts, nproc)
        .with_context(|| format!("training into {}", out.display()))?;
    finish(&out, &s)?;
    exit_if_stopped(&s);
    Ok(())
}

/// Options common to every way of running.
fn options(
    args: &Args,
    recipe: Recipe,
    base: Option<Recipe>,
    out: &Path,
    dev: candle_core::Device,
) -> TrainOptions {
    let mut opts = TrainOptions::new(recipe, &args.data, out);
    opts.base = base;
    opts.device = dev;
    opts.resume = args.resume;
    opts.backward = args.backward;
    opts.layout = args.layout;
    opts.deterministic = args.deterministic;
    opts.train_samples = args.train_samples;
    opts.val_samples = args.val_samples;
    opts.dist_timeout = Duration::from_secs(args.dist_timeout);
    opts.keep_checkpoints = args.keep_checkpoints;
    opts.init_from = args.init_from.clone();
    opts.max_nonfinite_updates = args.max_nonfinite_updates;
    opts.stop = train::stop::StopSource::Process;
    opts.progress = if args.no_bar {
        Progress::Lines
    } else {
        Progress::Auto
    };
    opts
}

/// The curves as a PNG beside the metrics, and the summary line.
fn finish(out: &Path, s: &train::TrainSummary) -> Result<()> {
    let metrics = out.join("metrics.jsonl");
    let plot = out.join("plot.png");
    tools::plot::plot_metrics(&metrics, &plot)
        .with_context(|| format!("plotting {}", metrics.display()))?;
    eprintln!("train: curves in {}", plot.display());
    let eval = s
        .last_eval
        .map(|r| json!({"top1": r.top1, "top5": r.top5, "val_loss": r.loss}));
    println!(
        "{}",
        json!({"steps": s.steps, "updates_per_epoch": s.updates_per_epoch, "wall_s": s.wall_s,
               "eval": eval, "stopped_by": s.stopped_by})
    );
    Ok(())
}

/// After a stop on a signal (the checkpoint is written): the documented exit code.
fn exit_if_stopped(s: &train::TrainSummary) {
    if let Some(reason) = &s.stopped_by {
        eprintln!(
            "train: stopped by {reason} after update {} (checkpoint written); continue with \
             --resume",
            s.steps
        );
        std::process::exit(train::stop::EXIT_STOPPED);
    }
}

/// One rank of a multi-process run (started by the launcher, torchrun or Slurm).
fn worker(args: &Args, out: &Path, info: &RankInfo) -> Result<()> {
    let (recipe, base) = load_recipe(args)?;
    let timeout = Duration::from_secs(args.dist_timeout);
    match ranks::join(info, train::recipe_hash(&recipe)?, &args.device, timeout)? {
        ranks::Joined::Test(mode) => ranks::test_mode(&mode, info),
        ranks::Joined::Nccl(token) => train_on_gpu(args, out, info, recipe, base, &token, timeout),
    }
}

fn train_on_gpu(
    args: &Args,
    out: &Path,
    info: &RankInfo,
    recipe: Recipe,
    base: Option<Recipe>,
    token: &[u8],
    timeout: Duration,
) -> Result<()> {
    let (dev, mut comm) = ranks::gpu_rank(info, token, timeout)?;
    let mut opts = options(args, recipe, base, out, dev);
    opts.local_world_size = info.local_world_size;
    let s = train::train_rank(&opts, comm.as_mut())
        .with_context(|| format!("rank {}: training into {}", info.rank, out.display()))?;
    if info.rank == 0 {
        finish(out, &s)?;
    }
    exit_if_stopped(&s);
    Ok(())
}
