//! `shard-imagenet SRC DST`: an ImageNet folder to WebDataset-style tar shards, indexes and a
//! manifest. `shard-imagenet verify DST` checks a finished set.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use tools::sharding::{self, ShardOptions};
use tools::source::ScanOptions;

/// Turns an ImageNet folder (train/<wnid>/*.JPEG; val/ in class folders or flat with a label
/// file) into tar shards with a binary index each and a manifest. Original JPEG bytes are stored
/// unchanged; CMYK JPEGs and PNGs are converted to RGB JPEG; unreadable files are listed in
/// DST/report.json and skipped, and then the run fails unless --allow-skips is given.
/// An interrupted run is completed by running the same command again.
///
/// `shard-imagenet verify DST` checks the manifest, every index and every checksum.
#[derive(Parser, Debug)]
#[command(name = "shard-imagenet", version)]
struct Args {
    /// The ImageNet folder (holding train/ and/or val/, or the Kaggle ILSVRC/ tree).
    src: PathBuf,
    /// Output directory.
    dst: PathBuf,
    /// Target shard size in bytes (of source files plus tar overhead).
    #[arg(long, default_value_t = 1 << 30)]
    shard_bytes: u64,
    /// Seed of the shuffled sample order.
    #[arg(long, default_value_t = 0)]
    shuffle_seed: u64,
    /// Keep the sorted order (train: by class, then file name; val: by file name).
    #[arg(long, conflicts_with = "shuffle_seed")]
    no_shuffle: bool,
    /// Re-encode images whose longer side exceeds N pixels down to N (off by default).
    #[arg(long, value_name = "N")]
    max_side: Option<u32>,
    /// JPEG quality for converted and re-encoded images.
    #[arg(long, default_value_t = 95)]
    quality: u8,
    /// Accept unreadable files (they are listed in the report) and write the manifest anyway.
    #[arg(long)]
    allow_skips: bool,
    /// Label file for a flat val/ (default: SRC/LOC_val_solution.csv or SRC/val_labels.txt).
    #[arg(long, value_name = "FILE")]
    val_labels: Option<PathBuf>,
    /// Synset file with 'wnid name' lines (default: SRC/LOC_synset_mapping.txt if present).
    #[arg(long, value_name = "FILE")]
    synsets: Option<PathBuf>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// No progress output.
    #[arg(long, short)]
    quiet: bool,
}

/// Checks a finished shard set: manifest, every index, every checksum, the tar structure.
#[derive(Parser, Debug)]
#[command(name = "shard-imagenet verify", version)]
struct VerifyArgs {
    /// The shard set directory (holding manifest.json).
    dst: PathBuf,
    /// Threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// No progress output.
    #[arg(long, short)]
    quiet: bool,
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn shard(args: Args) -> Result<ExitCode> {
    let opts = ShardOptions {
        shard_bytes: args.shard_bytes,
        shuffle_seed: (!args.no_shuffle).then_some(args.shuffle_seed),
        max_side: args.max_side,
        quality: args.quality,
        allow_skips: args.allow_skips,
        threads: args.threads.unwrap_or_else(cores),
        quiet: args.quiet,
        scan: ScanOptions {
            val_labels: args.val_labels,
            synsets: args.synsets,
        },
    };
    let s = sharding::run(&args.src, &args.dst, &opts)?;
    for note in &s.notes {
        println!("{note}");
    }
    if s.already_complete {
        println!(
            "{} already holds this shard set (same input and options): nothing to do",
            args.dst.display()
        );
    }
    for sp in &s.splits {
        let c = &sp.counts;
        println!(
            "{}: {} samples in {} shards ({:.1} MB); stored as is {}, converted {}, resized {}, skipped {}; greyscale {}, progressive {}",
            sp.name,
            c.samples,
            sp.num_shards,
            mb(c.stored_bytes),
            c.stored,
            c.converted,
            c.resized,
            c.skipped,
            c.grayscale,
            c.progressive
        );
        if sp.files_this_run > 0 {
            let secs = sp.seconds.max(1e-9);
            println!(
                "  this run: {} files, {:.1} MB read in {:.2} s: {:.0} files/s, {:.1} MB/s",
                sp.files_this_run,
                mb(sp.bytes_this_run),
                sp.seconds,
                sp.files_this_run as f64 / secs,
                mb(sp.bytes_this_run) / secs,
            );
        }
        if sp.num_shards_reused > 0 && !s.already_complete {
            println!(
                "  {} of {} shards reused from an earlier run",
                sp.num_shards_reused, sp.num_shards
            );
        }
    }
    println!("report: {}", s.report_path.display());
    if !s.manifest_written {
        eprintln!(
            "shard-imagenet: {} files skipped (listed in {}); rerun with --allow-skips to accept them and write the manifest",
            s.num_skipped,
            s.report_path.display()
        );
        return Ok(ExitCode::from(1));
    }
    if s.num_skipped > 0 {
        println!(
            "{} files skipped (accepted by --allow-skips), listed in the report",
            s.num_skipped
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(args: VerifyArgs) -> Result<ExitCode> {
    let start = Instant::now();
    let read = AtomicU64::new(0);
    let last = AtomicU64::new(0);
    let quiet = args.quiet;
    let progress = |n: u64| {
        let total = read.fetch_add(n, Ordering::Relaxed) + n;
        let secs = start.elapsed().as_secs();
        if !quiet && secs >= last.load(Ordering::Relaxed) + 30 {
            last.store(secs, Ordering::Relaxed);
            eprintln!("verify: {:.0} MB read", mb(total));
        }
    };
    let report = shards::verify(&args.dst, args.threads.unwrap_or_else(cores), &progress)?;
    for p in &report.problems {
        println!("{p}");
    }
    let secs = start.elapsed().as_secs_f64();
    if report.problems.is_empty() {
        println!(
            "ok: {} shards, {} samples, {:.1} MB checked in {secs:.1} s",
            report.num_shards,
            report.num_samples,
            mb(report.num_bytes)
        );
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "shard-imagenet verify: {} problems in {} (listed above)",
            report.problems.len(),
            args.dst.display()
        );
        Ok(ExitCode::from(1))
    }
}

fn main() -> ExitCode {
    let argv: Vec<_> = std::env::args_os().collect();
    let result = if argv.get(1).is_some_and(|a| a == "verify") {
        verify(VerifyArgs::parse_from(&argv[1..]))
    } else {
        shard(Args::parse_from(&argv))
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shard-imagenet: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
