//! `plot-metrics RUN [RUN...] [--label NAME]... --out plot.png`: training curves as a PNG, one
//! run or several overlaid.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Parser;
use tools::plot::{metrics_path, plot_runs, read_metrics, run_label, Metrics};

/// Draws runs' metrics.jsonl as a PNG with three panels: training loss (and validation loss)
/// against step, learning rate against step, and top-1/top-5 accuracy against epoch. Lines with
/// top1, top5 or val_loss are evaluations; other lines with loss or lr are training steps.
/// Missing values, null and NaN leave gaps; lines that are not JSON objects are skipped.
/// Several runs are overlaid, one colour each (e.g. A1 vs A2 vs A3, or the seeds of a sweep).
#[derive(Parser, Debug)]
#[command(name = "plot-metrics", version)]
struct Args {
    /// Metrics files (JSON lines), or run directories holding a metrics.jsonl.
    #[arg(required = true, value_name = "RUN")]
    inputs: Vec<PathBuf>,
    /// Legend name of a run; the i-th --label names the i-th input (default: the name of the
    /// run's directory).
    #[arg(long = "label", value_name = "NAME")]
    labels: Vec<String>,
    /// Output PNG (default: plot.png next to the metrics file for one run; runs.png in the
    /// current directory for several).
    #[arg(long, short)]
    out: Option<PathBuf>,
}

fn summary(m: &Metrics) -> String {
    format!(
        "{} training lines, {} evaluations{}",
        m.train.len(),
        m.eval.len(),
        if m.num_bad_lines > 0 {
            format!(", {} lines skipped (not JSON objects)", m.num_bad_lines)
        } else {
            String::new()
        }
    )
}

fn run(a: &Args) -> Result<()> {
    if a.labels.len() > a.inputs.len() {
        bail!(
            "{} --label given for {} inputs (the i-th --label names the i-th input)",
            a.labels.len(),
            a.inputs.len()
        );
    }
    let mut runs = Vec::with_capacity(a.inputs.len());
    for (i, input) in a.inputs.iter().enumerate() {
        let path = metrics_path(input);
        let label = a.labels.get(i).cloned().unwrap_or_else(|| run_label(input));
        runs.push((label, read_metrics(&path)?));
    }
    let out = match (&a.out, &a.inputs[..]) {
        (Some(out), _) => out.clone(),
        (None, [one]) => metrics_path(one).with_file_name("plot.png"),
        (None, _) => PathBuf::from("runs.png"),
    };
    plot_runs(&runs, &out)?;
    if let [(_, m)] = &runs[..] {
        println!("{}: {}", out.display(), summary(m));
    } else {
        for (label, m) in &runs {
            println!("{label}: {}", summary(m));
        }
        println!("{}: {} runs", out.display(), runs.len());
    }
    Ok(())
}

fn main() -> ExitCode {
    let a = Args::parse();
    tools::bench::exit_on_error("plot-metrics", run(&a))
}
