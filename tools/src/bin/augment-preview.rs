//! `augment-preview`: see what training sees.
//!
//! - `augment-preview --data SHARDS --recipe a2 --n 16 --out grid.png`: a grid of the first
//!   `n` training samples of an epoch exactly as the loader delivers them under the recipe's
//!   transforms (RandomResizedCrop, flip, RandAugment at the recipe's train size), optionally
//!   after the batch's Mixup/CutMix (`--mix`).
//! - `augment-preview --image IN.jpg --op NAME --magnitudes 0,3,7,10 --out grid.png`: one
//!   RandAugment op across magnitudes on one image (its centre square, resized to `--size`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;
use loader::mix::mix_u8_batch;
use loader::rand_augment::{Op, OpDraw, RandAugment, IMAGENET_FILL};
use loader::transform::Interpolation;
use loader::{Loader, LoaderConfig, PlanConfig};
use tools::bench::exit_on_error;
use trainer::recipe::{self, Recipe};
use trainer::train;

#[derive(Parser, Debug)]
#[command(
    name = "augment-preview",
    about = "PNG grids of augmented training samples"
)]
struct Args {
    /// Shard set directory (with manifest.json): preview training samples.
    #[arg(long, conflicts_with = "image")]
    data: Option<PathBuf>,
    /// Recipe: a1, a2, a3, ft or a TOML file.
    #[arg(long, default_value = "a2")]
    recipe: String,
    /// Recipe overrides, e.g. --set data.train_size_px=160.
    #[arg(long = "set")]
    overrides: Vec<String>,
    /// Number of samples in the grid.
    #[arg(long, default_value_t = 16)]
    n: usize,
    /// Split to read.
    #[arg(long, default_value = "train")]
    split: String,
    /// Epoch whose order and draws to show.
    #[arg(long, default_value_t = 0)]
    epoch: u64,
    /// Apply the batch's Mixup/CutMix (the draw of batch 0 of the epoch) as the trainer does.
    #[arg(long)]
    mix: bool,
    /// An image file: preview one op across magnitudes.
    #[arg(long, requires = "op")]
    image: Option<PathBuf>,
    /// RandAugment op name (timm's, e.g. Rotate, SolarizeIncreasing).
    #[arg(long)]
    op: Option<String>,
    /// Magnitudes (timm's 0..10 scale), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,3,7,10")]
    magnitudes: Vec<f64>,
    /// Use the negative direction of signed ops (rotation, shear, translation, enhancement).
    #[arg(long)]
    negate: bool,
    /// Side of each tile for --image, in pixels.
    #[arg(long, default_value_t = 224)]
    size: u32,
    /// Filter of geometric ops for --image: bilinear or bicubic.
    #[arg(long, default_value = "bicubic")]
    interpolation: String,
    /// Output PNG.
    #[arg(long)]
    out: PathBuf,
}

fn main() -> std::process::ExitCode {
    exit_on_error("augment-preview", run(Args::parse()))
}

fn run(a: Args) -> Result<()> {
    let (tiles, side) = match (&a.data, &a.image) {
        (Some(data), None) => samples(&a, data)?,
        (None, Some(image)) => op_sweep(&a, image)?,
        _ => bail!("give --data SHARDS (training samples) or --image FILE --op NAME"),
    };
    let grid = grid(&tiles, side);
    grid.save(&a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "augment-preview: wrote {} ({} tiles of {side}x{side})",
        a.out.display(),
        tiles.len()
    );
    Ok(())
}

fn load_recipe(a: &Args) -> Result<Recipe> {
    let base = if recipe::Recipe::PRESETS.contains(&a.recipe.as_str()) {
        Recipe::preset(&a.recipe)?
    } else {
        let text = std::fs::read_to_string(&a.recipe)
            .with_context(|| format!("reading recipe {}", a.recipe))?;
        Recipe::from_toml_str(&text).with_context(|| format!("recipe {}", a.recipe))?
    };
    Ok(base.with_overrides(&a.overrides)?)
}

/// The first `n` samples of the epoch as the loader delivers them under the recipe.
fn samples(a: &Args, data: &std::path::Path) -> Result<(Vec<Vec<u8>>, u32)> {
    let r = load_recipe(a)?;
    let size = r.data.train_size_px;
    // The trainer's own constructors: what training uses.
    let transform = train::train_transform(&r)?;
    let augment = train::rand_augment(&r)?;
    let ds = shards::Dataset::open(data)?;
    let split = Arc::new(ds.split(&a.split)?);
    let n = a.n.min(split.len() as usize).max(1);
    let mut plan = PlanConfig::new(0, n);
    plan.seed = r.run.seed;
    plan.repeats = r.augment.repeated_aug.max(1);
    let mut cfg = LoaderConfig::new(transform, plan);
    cfg.num_workers = std::thread::available_parallelism().map_or(1, |c| c.get());
    let mut l = Loader::new_with(split, cfg, augment)?;
    let mut run = l.epoch(a.epoch)?;
    let batch = run
        .next()
        .context("the split has no complete batch of that size")??;
    let mut images = batch.images()[..batch.len * (size * size * 3) as usize].to_vec();
    if a.mix {
        let draw = train::mix_config(&r).draw(r.run.seed, a.epoch, 0, size as usize, size as usize);
        eprintln!("augment-preview: batch 0 mix draw {draw:?}");
        let even = batch.len / 2 * 2;
        let len = (size * size * 3) as usize;
        mix_u8_batch(
            &mut images[..even * len],
            even,
            size as usize,
            size as usize,
            3,
            &draw,
        );
    }
    let tiles = images
        .chunks_exact((size * size * 3) as usize)
        .map(<[u8]>::to_vec)
        .collect();
    Ok((tiles, size))
}

/// One op at each magnitude on the centre square of `path`.
fn op_sweep(a: &Args, path: &std::path::Path) -> Result<(Vec<Vec<u8>>, u32)> {
    let op: Op =
        a.op.as_deref()
            .unwrap_or_default()
            .parse()
            .map_err(anyhow::Error::msg)?;
    let interpolation = match a.interpolation.as_str() {
        "bilinear" => Interpolation::Bilinear,
        "bicubic" => Interpolation::Bicubic,
        other => bail!("unknown --interpolation {other:?}: expected bilinear or bicubic"),
    };
    let img = image::open(path)
        .with_context(|| format!("reading {}", path.display()))?
        .to_rgb8();
    let side = img.width().min(img.height());
    let square = image::imageops::crop_imm(
        &img,
        (img.width() - side) / 2,
        (img.height() - side) / 2,
        side,
        side,
    )
    .to_image();
    let base = image::imageops::resize(
        &square,
        a.size,
        a.size,
        image::imageops::FilterType::CatmullRom,
    )
    .into_raw();
    let mut tiles = Vec::new();
    for &m in &a.magnitudes {
        if !(0.0..=30.0).contains(&m) {
            bail!("magnitude {m} is outside 0..30");
        }
        let mut t = base.clone();
        let draw = OpDraw {
            op,
            magnitude: m,
            negate: a.negate,
            interpolation,
        };
        RandAugment::apply_op(
            &draw,
            IMAGENET_FILL,
            &mut t,
            a.size as usize,
            a.size as usize,
        );
        eprintln!(
            "augment-preview: {op} magnitude {m}: argument {:?}",
            op.arg(m, a.negate)
        );
        tiles.push(t);
    }
    Ok((tiles, a.size))
}

/// Tiles (RGB8, `side` x `side`) in a near-square grid with 4-pixel white gaps.
fn grid(tiles: &[Vec<u8>], side: u32) -> image::RgbImage {
    let n = tiles.len().max(1) as u32;
    let cols = (n as f64).sqrt().ceil() as u32;
    let rows = n.div_ceil(cols);
    let gap = 4;
    let mut out = image::RgbImage::from_pixel(
        cols * (side + gap) + gap,
        rows * (side + gap) + gap,
        image::Rgb([255, 255, 255]),
    );
    for (i, t) in tiles.iter().enumerate() {
        let (c, r) = (i as u32 % cols, i as u32 / cols);
        let tile = image::RgbImage::from_raw(side, side, t.clone()).expect("tile size");
        image::imageops::replace(
            &mut out,
            &tile,
            (gap + c * (side + gap)) as i64,
            (gap + r * (side + gap)) as i64,
        );
    }
    out
}
