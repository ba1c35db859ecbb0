//! `plot-metrics RUN_DIR/metrics.jsonl --out plot.png`: training curves as a PNG.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Draws a run's metrics.jsonl as a PNG with three panels: training loss (and validation loss)
/// against step, learning rate against step, and top-1/top-5 accuracy against epoch. Lines with
/// top1, top5 or val_loss are evaluations; other lines with loss or lr are training steps.
/// Missing values, null and NaN leave gaps; lines that are not JSON objects are skipped.
#[derive(Parser, Debug)]
#[command(name = "plot-metrics", version)]
struct Args {
    /// The metrics file (JSON lines).
    metrics: PathBuf,
    /// Output PNG (default: plot.png next to the metrics file).
    #[arg(long, short)]
    out: Option<PathBuf>,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let run = || -> anyhow::Result<()> {
        let out = a
            .out
            .clone()
            .unwrap_or_else(|| a.metrics.with_file_name("plot.png"));
        let m = tools::plot::plot_metrics(&a.metrics, &out)?;
        println!(
            "{}: {} training lines, {} evaluations{}",
            out.display(),
            m.train.len(),
            m.eval.len(),
            if m.num_bad_lines > 0 {
                format!(", {} lines skipped (not JSON objects)", m.num_bad_lines)
            } else {
                String::new()
            }
        );
        Ok(())
    };
    tools::bench::exit_on_error("plot-metrics", run())
}
