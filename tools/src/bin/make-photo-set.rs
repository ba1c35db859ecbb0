//! `make-photo-set OUT PHOTO_DIR...`: an ImageNet-shaped benchmark set cut from real photos.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tools::photos::{find_photos, make_photo_set, PhotoSetOptions};

/// Cuts random 4:3 crops from the photographs under PHOTO_DIR (JPEG and PNG files, searched
/// recursively), resizes them to ImageNet-like sizes (mostly 500x375) and writes them as
/// baseline 4:2:0 JPEGs in an ImageNet layout (train/<wnid>/, val/<wnid>/). Used for decoding
/// benchmarks, where real photo content matters. `scripts/make-photo-set.sh` gets the photos.
#[derive(Parser, Debug)]
#[command(name = "make-photo-set", version)]
struct Args {
    /// Output directory (must not already hold train/ or val/).
    out: PathBuf,
    /// Directories (or files) holding photographs.
    #[arg(required = true)]
    photos: Vec<PathBuf>,
    /// Training images.
    #[arg(long, default_value_t = 5000)]
    train_images: usize,
    /// Validation images.
    #[arg(long, default_value_t = 500)]
    val_images: usize,
    /// Classes.
    #[arg(long, default_value_t = 10)]
    classes: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// JPEG quality.
    #[arg(long, default_value_t = 95)]
    quality: u8,
    /// Photos with a shorter side below this are not used.
    #[arg(long, default_value_t = 600)]
    min_short_side: u32,
    /// Threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let run = || -> anyhow::Result<()> {
        let photos = find_photos(&a.photos)?;
        let opts = PhotoSetOptions {
            train_images: a.train_images,
            val_images: a.val_images,
            classes: a.classes,
            seed: a.seed,
            quality: a.quality,
            min_short_side: a.min_short_side,
            threads: a
                .threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        };
        let s = make_photo_set(&photos, &a.out, &opts)?;
        for (p, why) in &s.photos_skipped {
            println!("not used: {}: {why}", p.display());
        }
        println!(
            "{}: {} files from {} photos, {:.1} MB (mean {:.0} KB) in {:.1} s",
            a.out.display(),
            s.files,
            s.photos_used,
            s.bytes as f64 / 1e6,
            s.bytes as f64 / 1e3 / s.files.max(1) as f64,
            s.seconds
        );
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("make-photo-set: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
