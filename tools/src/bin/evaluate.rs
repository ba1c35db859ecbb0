//! `evaluate`: a checkpoint's top-1 / top-5 over test resolutions and crop ratios, in one run.
//!
//! ```text
//! evaluate --checkpoint P --data SHARDS [--split val] [--sizes 160,192,224,256,288]
//!          [--crop-pct 0.875,0.95,1.0] [--interpolation bicubic|bilinear] [--batch-size B]
//!          [--device cpu|cuda:N] [--model NAME] [--workers N] [--samples N] [--layout nhwc|nchw]
//!          [--real-labels real.json]
//! ```
//!
//! The network: `--model`, else the run's `recipe.toml` beside the checkpoint's directory (a
//! `train` run keeps `RUN/recipe.toml` and `RUN/checkpoints/step-N.safetensors`), which also
//! gives the train size the lines report and the defaults (`data.test_size_px`, `data.crop_pct`,
//! `data.test_interpolation`). Prints one JSON line per (size, crop_pct) with `size`,
//! `crop_pct`, `top1`, `top5`, `loss`, `images`, `images_per_s`, `train_size`, and a table on
//! stderr at the end, and a PNG of top-1 against test size (a line per crop ratio, the train size
//! marked). Each evaluation is exactly `train --eval-only` at that size and crop.
//!
//! Weights: `train`'s safetensors checkpoints, timm's `.safetensors`, or PyTorch `.pth` files
//! (timm's released ResNet-strikes-back weights), by timm's tensor names
//! (`trainer::weights`). With `--real-labels`, each line also has ImageNet-ReaL's `real_top1`,
//! `real_top5` and `real_images` (`trainer::train::real`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::json;
use trainer::model::{ActivationLayout, NetConfig};
use trainer::recipe::{Interpolation, Recipe};
use trainer::train;

#[derive(Parser, Debug)]
#[command(
    name = "evaluate",
    about = "Top-1/top-5 of a checkpoint over test sizes and crop ratios"
)]
struct Args {
    /// Weights with timm's names: .safetensors, or a PyTorch .pth (bare state_dict, or under
    /// "state_dict" or "model").
    #[arg(long)]
    checkpoint: PathBuf,
    /// Shard set.
    #[arg(long)]
    data: PathBuf,
    /// Split to evaluate.
    #[arg(long, default_value = "val")]
    split: String,
    /// Test sizes in pixels, comma-separated (default: the recipe's data.test_size_px, or 224).
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<u32>,
    /// Centre-crop ratios, comma-separated (default: the recipe's data.crop_pct, or 0.95).
    #[arg(long = "crop-pct", value_delimiter = ',')]
    crop_pct: Vec<f64>,
    /// Resize interpolation (default: the recipe's data.test_interpolation, or bicubic).
    #[arg(long)]
    interpolation: Option<String>,
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Network (timm name); required when no recipe.toml sits beside the checkpoint.
    #[arg(long)]
    model: Option<String>,
    /// Loader threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Only the first N images of the split (0 = all).
    #[arg(long, default_value_t = 0)]
    samples: u64,
    /// Activation layout: nhwc (default, the fast path) or nchw (candle's ops).
    #[arg(long)]
    layout: Option<ActivationLayout>,
    /// ImageNet-ReaL labels (real.json: one list of class indices per ILSVRC2012 validation
    /// image, matched to the shards by file name); adds real_top1/real_top5 to each line.
    #[arg(long = "real-labels", value_name = "FILE")]
    real_labels: Option<PathBuf>,
    /// PNG of top-1 against test size, a line per crop ratio, the train size marked (default:
    /// beside the checkpoint, `<name>.eval-<split>.png`).
    #[arg(long, value_name = "PNG")]
    plot: Option<PathBuf>,
    /// No PNG.
    #[arg(long, conflicts_with = "plot")]
    no_plot: bool,
    /// No progress display.
    #[arg(long, short)]
    quiet: bool,
    /// Benchmark: before each evaluation, run the loader alone over the same images with the
    /// same transform, batch size and threads, and add `loader_images_per_s` and
    /// `ratio_vs_loader` (evaluation images/s over the loader's) to the line.
    #[arg(long)]
    loader_baseline: bool,
}

/// Images/s of the loader alone: the evaluation's loader (`train::eval_loader`), no model.
fn loader_images_per_s(
    split: &std::sync::Arc<shards::Split>,
    transform: &loader::Transform,
    batch: usize,
    workers: usize,
    samples: u64,
) -> Result<f64> {
    let mut loader = train::eval_loader(
        split.clone(),
        transform.clone(),
        batch,
        workers,
        samples,
        (0, 1),
    )?;
    let t0 = Instant::now();
    let mut images = 0;
    for b in loader.epoch(0)? {
        images += b?.len;
    }
    Ok(images as f64 / t0.elapsed().as_secs_f64().max(1e-9))
}

/// The recipe of the run that wrote `checkpoint` (`RUN/recipe.toml` for
/// `RUN/checkpoints/step-N.safetensors`), when there is one.
fn run_recipe(checkpoint: &Path) -> Result<Option<(PathBuf, Recipe)>> {
    let Some(run_dir) = checkpoint.parent().and_then(Path::parent) else {
        return Ok(None);
    };
    let path = run_dir.join("recipe.toml");
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let recipe = Recipe::from_toml_str(&text)
        .with_context(|| format!("reading recipe {}", path.display()))?;
    Ok(Some((path, recipe)))
}

fn parse_interpolation(s: &str) -> Result<Interpolation> {
    Ok(match s {
        "bilinear" => Interpolation::Bilinear,
        "bicubic" => Interpolation::Bicubic,
        other => bail!("--interpolation {other:?}: expected bilinear or bicubic"),
    })
}

fn run(args: Args) -> Result<()> {
    let recipe = run_recipe(&args.checkpoint)?;
    let model_name = match (&args.model, &recipe) {
        (Some(m), _) => m.clone(),
        (None, Some((_, r))) => r.model.name.clone(),
        (None, None) => bail!(
            "{}: no recipe.toml beside the checkpoint's directory; name the network with --model",
            args.checkpoint.display()
        ),
    };
    let data_cfg = recipe.as_ref().map(|(_, r)| r.data.clone());
    let sizes = match (&args.sizes[..], &data_cfg) {
        ([], Some(d)) => vec![d.test_size_px],
        ([], None) => vec![224],
        (s, _) => s.to_vec(),
    };
    let crops = match (&args.crop_pct[..], &data_cfg) {
        ([], Some(d)) => vec![d.crop_pct],
        ([], None) => vec![0.95],
        (c, _) => c.to_vec(),
    };
    if let Some(c) = crops.iter().find(|c| !(**c > 0.0 && **c <= 1.0)) {
        bail!("--crop-pct {c}: must be in (0, 1]")
    }
    if let Some(s) = sizes.iter().find(|s| **s == 0) {
        bail!("--sizes {s}: must be positive")
    }
    let interpolation = match (&args.interpolation, &data_cfg) {
        (Some(s), _) => parse_interpolation(s)?,
        (None, Some(d)) => d.test_interpolation,
        (None, None) => Interpolation::Bicubic,
    };
    let interp_name = format!("{interpolation:?}").to_lowercase();
    let train_size = data_cfg.as_ref().map(|d| d.train_size_px);

    let dev = tools::bench::parse_device(&args.device)?;
    let (split, classes) = train::open_split(&args.data, &args.split)?;
    let cfg = NetConfig::by_name(&model_name)?;
    let base = recipe.map(|(_, r)| r).unwrap_or_else(Recipe::a1);
    let real = match &args.real_labels {
        Some(path) => {
            let labels = train::real::RealLabels::load(path)?;
            let real = labels.for_split(&split, args.samples, classes)?;
            eprintln!(
                "evaluate: ReaL labels {}: {} of the split's images have a label list",
                path.display(),
                real.num_counted()
            );
            Some(real)
        }
        None => None,
    };
    let (varmap, mut model) =
        train::build_model_for_weights(&base, Some(&cfg), classes, &dev, &args.checkpoint)?;
    model.set_layout(args.layout.unwrap_or(ActivationLayout::Nhwc));
    trainer::checkpoint::load_weights(&varmap, &args.checkpoint)
        .with_context(|| format!("loading {} into {model_name}", args.checkpoint.display()))?;
    let feed = trainer::feed::Feed::with_normalization(&dev, model.config().normalization())?;
    let workers = match args.workers {
        0 => tools::bench::cores(),
        n => n,
    };
    let batch = args.batch_size.max(1);

    let mut rows = Vec::new();
    let total = sizes.len() * crops.len();
    for &size in &sizes {
        for &crop_pct in &crops {
            eprintln!(
                "evaluate: {} of {total}: {size} px, crop {crop_pct}, {interp_name}",
                rows.len() + 1
            );
            let transform = train::eval_transform(size, crop_pct, interpolation)?;
            let loader_ips = if args.loader_baseline {
                Some(loader_images_per_s(
                    &split,
                    &transform,
                    batch,
                    workers,
                    args.samples,
                )?)
            } else {
                None
            };
            let t0 = Instant::now();
            let total_images = train::eval_images(&split, args.samples);
            let mut progress = tools::progress::Progress::counting(
                &format!("{size} px, crop {crop_pct}"),
                total_images,
                "images",
                args.quiet,
            );
            let mut shown = 0;
            let mut on_batch = |done: u64| {
                progress.add(done - shown, 0);
                shown = done;
            };
            let opts = train::EvalOptions {
                num_samples: args.samples,
                real: real.as_ref(),
                progress: Some(&mut on_batch),
                ..train::EvalOptions::new(batch, workers)
            };
            let r = train::evaluate_with(&model, &feed, split.clone(), transform, opts)?;
            progress.finish();
            let dt = t0.elapsed().as_secs_f64();
            let mut line = json!({
                "checkpoint": args.checkpoint.display().to_string(), "model": model_name,
                "split": args.split, "size": size, "crop_pct": crop_pct,
                "interpolation": interp_name, "train_size": train_size,
                "top1": r.top1, "top5": r.top5, "loss": r.loss, "images": r.samples,
                "images_per_s": r.samples as f64 / dt.max(1e-9), "seconds": dt,
            });
            if let Some(l) = loader_ips {
                line["loader_images_per_s"] = json!(l);
                line["ratio_vs_loader"] = json!(r.samples as f64 / dt.max(1e-9) / l);
            }
            if let Some(real) = &r.real {
                line["real_top1"] = json!(real.top1);
                line["real_top5"] = json!(real.top5);
                line["real_images"] = json!(real.samples);
            }
            println!("{line}");
            rows.push((size, crop_pct, r, r.samples as f64 / dt.max(1e-9)));
        }
    }
    if !args.no_plot {
        let out = args.plot.clone().unwrap_or_else(|| {
            let stem = args
                .checkpoint
                .file_stem()
                .map_or("weights".into(), |s| s.to_string_lossy().into_owned());
            args.checkpoint
                .with_file_name(format!("{stem}.eval-{}.png", args.split))
        });
        let points: Vec<tools::plot::SweepPoint> = rows
            .iter()
            .map(|(size, crop_pct, r, _)| tools::plot::SweepPoint {
                size: *size,
                crop_pct: *crop_pct,
                top1: r.top1,
            })
            .collect();
        let title = format!(
            "{model_name} on {} ({}), {interp_name}",
            args.data.display(),
            args.split
        );
        tools::plot::plot_resolution_sweep(&points, train_size, &title, &out)
            .with_context(|| format!("writing {}", out.display()))?;
        eprintln!("evaluate: top-1 against test size in {}", out.display());
    }
    let real_head = if real.is_some() { "  ReaL-1" } else { "" };
    eprintln!(
        "{:>6} {:>6} {:>8} {:>8}{real_head} {:>10}",
        "size", "crop", "top1", "top5", "images/s"
    );
    for (size, crop, r, ips) in rows {
        let mark = if Some(size) == train_size {
            " (train size)"
        } else {
            ""
        };
        let real = r
            .real
            .map_or(String::new(), |x| format!(" {:>7.2}", x.top1));
        eprintln!(
            "{size:>6} {crop:>6.3} {:>8.2} {:>8.2}{real} {ips:>10.1}{mark}",
            r.top1, r.top5
        );
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    tools::alloc::tune();
    tools::bench::exit_on_error("evaluate", run(Args::parse()))
}
