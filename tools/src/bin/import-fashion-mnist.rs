//! `import-fashion-mnist SRC OUT`: the Fashion-MNIST IDX files to an ImageNet-style folder.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tools::fashion_mnist::{import, ImportOptions, CLASS_DIRS};

/// Reads Fashion-MNIST's four IDX files from SRC (train-images-idx3-ubyte, train-labels-idx1-ubyte,
/// t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; gzip-compressed `.gz`, as Debian's
/// dataset-fashion-mnist ships them in /usr/share/datasets/fashion-mnist, or plain) and writes
/// OUT/train/<class>/<index>.JPEG and OUT/val/<class>/<index>.JPEG (the test set) as greyscale
/// JPEGs, with class folders c0_tshirt_top ... c9_ankle_boot and OUT/LOC_synset_mapping.txt.
/// Shard the result with `shard-imagenet OUT DST`. Deterministic.
#[derive(Parser, Debug)]
#[command(name = "import-fashion-mnist", version)]
struct Args {
    /// Directory holding the IDX files.
    src: PathBuf,
    /// Output directory (must not already hold train/ or val/).
    out: PathBuf,
    /// Resize the 28 x 28 images to PX x PX (bilinear), e.g. 32 or 64.
    #[arg(long, value_name = "PX")]
    upscale: Option<u32>,
    /// Keep only the first N images of each class in each split (for quick runs).
    #[arg(long, value_name = "N")]
    limit_per_class: Option<usize>,
    /// JPEG quality.
    #[arg(long, default_value_t = 95)]
    quality: u8,
    /// Threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// No progress output.
    #[arg(long, short)]
    quiet: bool,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let run = || -> anyhow::Result<()> {
        let opts = ImportOptions {
            upscale_px: a.upscale,
            limit_per_class: a.limit_per_class,
            quality: a.quality,
            threads: a.threads.unwrap_or(ImportOptions::default().threads),
            quiet: a.quiet,
        };
        let s = import(&a.src, &a.out, &opts)?;
        let (mut files, mut bytes) = (0, 0);
        for sp in &s.splits {
            let per_class: Vec<String> = CLASS_DIRS
                .iter()
                .zip(&sp.num_per_class)
                .map(|(d, n)| format!("{d} {n}"))
                .collect();
            println!(
                "{}: {} of {} images, {:.1} MB; {}",
                sp.name,
                sp.num_files(),
                sp.num_source,
                sp.bytes as f64 / 1e6,
                per_class.join(", ")
            );
            files += sp.num_files();
            bytes += sp.bytes;
        }
        println!(
            "{}: {files} files of {px}x{px}, {:.1} MB (mean {:.0} bytes) in {:.1} s",
            a.out.display(),
            bytes as f64 / 1e6,
            bytes as f64 / files.max(1) as f64,
            s.seconds,
            px = s.size_px
        );
        Ok(())
    };
    tools::bench::exit_on_error("import-fashion-mnist", run())
}
