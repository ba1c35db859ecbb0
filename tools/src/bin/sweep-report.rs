//! `sweep-report DIR... [--out DIR]`: the final accuracy of a seed study's runs.
//!
//! Reads the final evaluation of each finished run (the run directories under each DIR, or DIR
//! itself if it is a run), prints a table (seed, top-1, top-5, ReaL top-1 when reported) with
//! n, mean, sample std, min, median, max and the Gaussian fit, lists the unfinished runs
//! (never averaged in), writes `sweep-report.json` and `sweep-report.png` (the top-1 histogram
//! with the fitted normal curve) into `--out` (default: the first DIR), and ends with one JSON
//! line: top-1's `n`, `mean`, `std`, `min`, `max`, `median`, the `unfinished` runs and the
//! files written. Exit codes: 0 success, 2 error.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::json;
use tools::sweep::{find_runs, Report};

#[derive(Parser, Debug)]
#[command(
    name = "sweep-report",
    about = "Table, statistics and histogram of a seed study's final top-1"
)]
struct Args {
    /// Sweep directories (their run directories are read) or run directories.
    #[arg(required = true, value_name = "DIR")]
    dirs: Vec<PathBuf>,
    /// Where sweep-report.json and sweep-report.png go (default: the first DIR).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("sweep-report: error: {e:#}");
        std::process::exit(2);
    }
}

fn title(dirs: &[PathBuf], n: usize) -> String {
    let name = |d: &Path| {
        std::path::absolute(d)
            .ok()
            .and_then(|a| a.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| d.display().to_string())
    };
    let names: Vec<String> = dirs.iter().map(|d| name(d)).collect();
    format!("{}: top-1 over {n} seed(s)", names.join(", "))
}

fn run(args: Args) -> Result<()> {
    let mut runs = Vec::new();
    for d in &args.dirs {
        if !d.is_dir() {
            bail!(
                "{}: not a directory (expected a sweep or run directory)",
                d.display()
            );
        }
        runs.extend(find_runs(d)?);
    }
    if runs.is_empty() {
        bail!(
            "no run directories under {} (a run has recipe.toml or metrics.jsonl)",
            args.dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let report = Report::new(runs);
    let out = args.out.clone().unwrap_or_else(|| args.dirs[0].clone());
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let json_path = out.join("sweep-report.json");
    let text = serde_json::to_string_pretty(&report.to_json()).expect("JSON values serialise");
    std::fs::write(&json_path, text + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    let top1 = report.values("top1");
    let png_path = out.join("sweep-report.png");
    let png = if top1.is_empty() {
        None
    } else {
        tools::plot::plot_seed_histogram(&top1, &title(&args.dirs, top1.len()), &png_path)
            .with_context(|| format!("drawing {}", png_path.display()))?;
        Some(png_path.display().to_string())
    };
    print!("{}", report.table());
    println!(
        "{}",
        report.summary_line(json!({
            "report": json_path.display().to_string(), "histogram": png,
        }))
    );
    Ok(())
}
