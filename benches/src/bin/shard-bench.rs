//! `shard-bench SRC --work DIR`: how fast `shard-imagenet` turns a folder into shards, against
//! the floor set by the same machine copying the same files.
//!
//! Per repeat, two measurements on the same files, in the same process, back to back:
//! - `copy`: read every source file and append it to one output file, then sync it: the file
//!   I/O any sharder must do, with no parsing, hashing or tar framing.
//! - `shard`: `shard-imagenet SRC DST` with default options (sniffing, tar, index, CRC-32,
//!   SHA-256, syncs), into a fresh directory.
//!
//! Both see the page cache as the previous step left it (the first repeat warms it). One JSON
//! line per measurement, then one with the median ratio `shard / copy` in files/s.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::json;
use tools::bench::{exit_on_error, git_rev, median};
use tools::sharding::{run, ShardOptions};
use tools::source::{scan, ScanOptions};

#[derive(Parser, Debug)]
#[command(name = "shard-bench")]
struct Args {
    /// An ImageNet-style folder.
    src: PathBuf,
    /// Scratch directory for the outputs (emptied of what this program writes).
    #[arg(long)]
    work: PathBuf,
    /// Worker threads for shard-imagenet (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Shard size for shard-imagenet (default: its default, 1 GiB). ImageNet at 1 GiB makes
    /// about 140 shards; a small set needs smaller shards to have as many as there are threads.
    #[arg(long)]
    shard_bytes: Option<u64>,
    /// Repeats; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

fn main() -> std::process::ExitCode {
    exit_on_error("shard-bench", run_bench(Args::parse()))
}

fn run_bench(a: Args) -> Result<()> {
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let source = scan(&a.src, &ScanOptions::default())?;
    let files: Vec<PathBuf> = source
        .splits
        .iter()
        .flat_map(|s| s.samples.iter().map(|x| x.path.clone()))
        .collect();
    std::fs::create_dir_all(&a.work)?;
    let git_rev = git_rev();
    let mut ratios = Vec::new();
    for rep in 0..a.repeats {
        // Baseline: plain copy of the same bytes into one file.
        let copy_path = a.work.join("copy.bin");
        let t = Instant::now();
        let mut out =
            std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&copy_path)?);
        let mut bytes = 0u64;
        for f in &files {
            let data = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            bytes += data.len() as u64;
            out.write_all(&data)?;
        }
        out.into_inner()?.sync_all()?;
        let copy_s = t.elapsed().as_secs_f64();
        std::fs::remove_file(&copy_path)?;

        let dst = a.work.join("shards");
        if dst.exists() {
            std::fs::remove_dir_all(&dst)?;
        }
        let t = Instant::now();
        let mut opts = ShardOptions {
            threads,
            quiet: true,
            allow_skips: true,
            ..ShardOptions::default()
        };
        if let Some(b) = a.shard_bytes {
            opts.shard_bytes = b;
        }
        run(&a.src, &dst, &opts)?;
        let shard_s = t.elapsed().as_secs_f64();

        let n = files.len() as f64;
        for (what, secs, thr) in [("copy", copy_s, 1), ("shard", shard_s, threads)] {
            println!(
                "{}",
                json!({
                    "bench": "shard-imagenet", "what": what, "repeat": rep, "git_rev": git_rev,
                    "threads": thr, "files": files.len(), "bytes": bytes, "seconds": secs,
                    "shard_bytes": opts.shard_bytes,
                    "files_per_s": n / secs, "mb_per_s": bytes as f64 / 1e6 / secs,
                })
            );
        }
        ratios.push(copy_s / shard_s);
    }
    println!(
        "{}",
        json!({
            "bench": "shard-imagenet", "what": "ratio", "git_rev": git_rev,
            "shard_over_copy_throughput_median": median(ratios),
        })
    );
    Ok(())
}
