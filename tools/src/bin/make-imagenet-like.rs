//! `make-imagenet-like OUT`: a generated ImageNet-style folder of real JPEG files.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tools::synth::{generate, SynthOptions, ValLayout};

/// Writes an ImageNet-style folder (train/<wnid>/*.JPEG, val/, LOC_val_solution.csv,
/// LOC_synset_mapping.txt) of generated images that a small network can learn: each class has
/// its own shape, texture and colour, drawn at a random position, scale and rotation over a
/// random background with noise, at ImageNet-like sizes. Deterministic from --seed.
#[derive(Parser, Debug)]
#[command(name = "make-imagenet-like", version)]
struct Args {
    /// Output directory (must not already hold train/ or val/).
    out: PathBuf,
    /// Number of classes.
    #[arg(long, default_value_t = 10)]
    classes: usize,
    /// Training images per class.
    #[arg(long, default_value_t = 100)]
    per_class: usize,
    /// Validation images per class (default: a fifth of --per-class, at least 1).
    #[arg(long)]
    val_per_class: Option<usize>,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write a CMYK JPEG, a PNG named .JPEG, a greyscale, a progressive and a truncated JPEG.
    #[arg(long)]
    oddities: bool,
    /// Validation layout: kaggle (flat + LOC_val_solution.csv), text (flat + val_labels.txt), folders.
    #[arg(long, default_value = "kaggle")]
    val_layout: ValLayout,
    /// JPEG quality.
    #[arg(long, default_value_t = 90)]
    quality: u8,
    /// Threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let defaults = SynthOptions::default();
    let opts = SynthOptions {
        classes: a.classes,
        per_class: a.per_class,
        val_per_class: a.val_per_class.unwrap_or((a.per_class / 5).max(1)),
        seed: a.seed,
        oddities: a.oddities,
        val_layout: a.val_layout,
        quality: a.quality,
        threads: a.threads.unwrap_or(defaults.threads),
    };
    match generate(&a.out, &opts) {
        Ok(s) => {
            println!(
                "{}: {} files, {:.1} MB in {:.1} s",
                a.out.display(),
                s.files,
                s.bytes as f64 / 1e6,
                s.seconds
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("make-imagenet-like: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
