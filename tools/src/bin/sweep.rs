//! `sweep`: one recipe over many seeds, one run directory per seed.
//!
//! ```text
//! sweep --recipe a2 --seeds 0..100 --data SHARDS --out DIR [--train-bin PATH] [--dry-run]
//!       [--slurm-array] [--quiet] [-- TRAIN OPTIONS...]
//! ```
//!
//! Seed N trains in `DIR/seed-000N` (`train --set run.seed=N`, its output appended to
//! `DIR/seed-000N/train.log`), one seed after another. A finished seed is skipped (see
//! `tools::sweep` for the criterion); an unfinished one with a checkpoint continues with
//! `--resume`. The first failing seed stops the sweep with its error and log. `--dry-run`
//! prints the commands, `--slurm-array` writes `DIR/sweep.sbatch` (one seed per array task)
//! instead of running. Exit codes: 0 success, 2 error.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::json;
use tools::sweep::{parse_seeds, run_seed, run_status, RunStatus, SweepPlan};

#[derive(Parser, Debug)]
#[command(
    name = "sweep",
    about = "Train one recipe over many seeds, one run directory (DIR/seed-000N) per seed"
)]
struct Args {
    /// Preset (a1, a2, a3, ft) or a complete recipe file, as `train --recipe`.
    #[arg(long)]
    recipe: String,
    /// Seeds: a half-open range (0..100 = 0 to 99), a list (3,5,9), or both (0..10,20).
    #[arg(long)]
    seeds: String,
    /// Shard set directory, as `train --data`.
    #[arg(long)]
    data: PathBuf,
    /// Sweep directory: seed N runs in DIR/seed-000N.
    #[arg(long)]
    out: PathBuf,
    /// The `train` executable (default: `train` beside this program).
    #[arg(long)]
    train_bin: Option<PathBuf>,
    /// Print one command per seed instead of running.
    #[arg(long)]
    dry_run: bool,
    /// Write DIR/sweep.sbatch, a Slurm job array with one seed per task, instead of running.
    #[arg(long, conflicts_with = "dry_run")]
    slurm_array: bool,
    /// Only the sweep's own progress lines, not each run's log lines (they are in train.log).
    #[arg(long)]
    quiet: bool,
    /// Options passed to every `train` verbatim (after `--`).
    #[arg(last = true, value_name = "TRAIN OPTIONS")]
    train_args: Vec<String>,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("sweep: error: {e:#}");
        std::process::exit(2);
    }
}

fn default_train_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this program")?;
    let name = format!("train{}", std::env::consts::EXE_SUFFIX);
    Ok(exe.with_file_name(name))
}

fn run(args: Args) -> Result<()> {
    let seeds = parse_seeds(&args.seeds)?;
    let train_bin = match args.train_bin {
        Some(p) => p,
        None => default_train_bin()?,
    };
    if !args.dry_run && !train_bin.is_file() {
        bail!(
            "{}: no train executable there (build it with `cargo build --release -p tools`, or \
             name it with --train-bin)",
            train_bin.display()
        );
    }
    let plan = SweepPlan {
        train_bin,
        recipe: args.recipe,
        data: args.data,
        out: args.out,
        train_args: args.train_args,
    };
    plan.validate()?;
    let status: Vec<RunStatus> = seeds
        .iter()
        .map(|&s| run_status(&plan.run_dir(s)))
        .collect();
    let todo: Vec<u64> = seeds
        .iter()
        .zip(&status)
        .filter(|(_, st)| st.finished().is_none())
        .map(|(&s, _)| s)
        .collect();
    let resumable = |st: &RunStatus| {
        matches!(
            st,
            RunStatus::Unfinished {
                resumable: true,
                ..
            }
        )
    };

    if args.dry_run {
        for (&seed, st) in seeds.iter().zip(&status) {
            match st.finished() {
                Some(e) => println!(
                    "# seed {seed}: finished (top-1 {:.2}), skipped: {}",
                    e.top1,
                    plan.run_dir(seed).display()
                ),
                None => println!("{}", plan.command_line(seed, resumable(st))),
            }
        }
        return Ok(());
    }
    if args.slurm_array {
        let skipped = seeds.len() - todo.len();
        if todo.is_empty() {
            eprintln!(
                "sweep: all {} seeds are finished; no script written",
                seeds.len()
            );
            return Ok(());
        }
        std::fs::create_dir_all(&plan.out)
            .with_context(|| format!("creating {}", plan.out.display()))?;
        let cwd = std::env::current_dir().context("reading the current directory")?;
        let path = plan.out.join("sweep.sbatch");
        std::fs::write(&path, plan.slurm_script(&todo, &cwd)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!(
            "sweep: wrote {} with {} array task(s){}; submit with `sbatch {}`",
            path.display(),
            todo.len(),
            if skipped > 0 {
                format!(" ({skipped} finished seed(s) left out)")
            } else {
                String::new()
            },
            path.display()
        );
        println!(
            "{}",
            json!({"script": path.display().to_string(), "tasks": todo.len(), "skipped": skipped})
        );
        return Ok(());
    }

    let total = seeds.len();
    let t0 = Instant::now();
    let (mut done, mut skipped) = (0usize, 0usize);
    for (i, (&seed, st)) in seeds.iter().zip(&status).enumerate() {
        let dir = plan.run_dir(seed);
        let at = format!("seed {seed} [{}/{total}]", i + 1);
        if let Some(e) = st.finished() {
            skipped += 1;
            eprintln!(
                "sweep: {at}: finished already (top-1 {:.2}), skipped ({done} run, {skipped} \
                 skipped, {} left)",
                e.top1,
                total - i - 1
            );
            continue;
        }
        let resume = resumable(st);
        eprintln!(
            "sweep: {at}: {} -> {}",
            if resume { "resuming" } else { "training" },
            dir.display()
        );
        let t = Instant::now();
        let prefix = format!("[seed {seed}] ");
        let quiet = args.quiet;
        let out = run_seed(&plan, seed, resume, &mut |line| {
            if !quiet {
                eprintln!("{prefix}{line}");
            }
        })?;
        let log = dir.join("train.log");
        if !out.success {
            bail!(
                "seed {seed} failed ({}): {}\n  log: {}\n  ({done} seed(s) run, {skipped} skipped \
                 before it; a rerun skips the finished ones)",
                out.status,
                out.error.as_deref().unwrap_or("no output"),
                log.display()
            );
        }
        let Some(e) = run_status(&dir).finished().cloned() else {
            let why = match run_status(&dir) {
                RunStatus::Unfinished { reason, .. } => reason,
                RunStatus::Finished(_) => unreachable!("checked"),
            };
            bail!(
                "seed {seed}: train exited successfully but {} is not finished: {why}\n  log: {}",
                dir.display(),
                log.display()
            );
        };
        done += 1;
        eprintln!(
            "sweep: {at}: finished in {:.1} s, top-1 {:.2} ({done} run, {skipped} skipped, {} \
             left)",
            t.elapsed().as_secs_f64(),
            e.top1,
            total - i - 1
        );
    }
    eprintln!(
        "sweep: {total} seed(s): {done} run, {skipped} skipped, {:.1} s; report with \
         `sweep-report {}`",
        t0.elapsed().as_secs_f64(),
        plan.out.display()
    );
    println!(
        "{}",
        json!({"seeds": total, "run": done, "skipped": skipped,
               "out": plan.out.display().to_string(), "wall_s": t0.elapsed().as_secs_f64()})
    );
    Ok(())
}
