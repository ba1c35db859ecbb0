//! Seed studies: one recipe trained over many seeds (`sweep`), and the spread of the final
//! accuracy over the finished runs (`sweep-report`).
//!
//! A sweep is a directory of run directories, `OUT/seed-0007` for seed 7, each written by
//! `train --set run.seed=7` as any other run. Whether a run is finished is read from what
//! `train` leaves behind ([`run_status`]): its `recipe.toml` gives the schedule's length, its
//! latest checkpoint must be the one written after the schedule's last epoch (loader position
//! epoch = all epochs, micro-batch 0), and `metrics.jsonl` must hold the evaluation of that
//! checkpoint's update (the last such line counts: a resumed run appends). Anything short of
//! that is unfinished: `sweep` runs it again (with `--resume` when it has a checkpoint) and
//! `sweep-report` lists it without averaging it in.
//!
//! The statistics ([`Stats`]) are over the finished runs' values: mean, sample standard
//! deviation (n - 1), min, max and median; the Gaussian fit is the normal curve of that mean and
//! sample deviation, as `plot::plot_seed_histogram` draws it.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use trainer::checkpoint::{self, CheckpointError};
use trainer::recipe::Recipe;

/// The run directory name of `seed`: `seed-0007`.
pub fn seed_dir_name(seed: u64) -> String {
    format!("seed-{seed:04}")
}

/// The seed in a run directory name made by [`seed_dir_name`].
pub fn seed_of_dir_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seed-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Parses a seed list: comma-separated parts, each a seed (`7`) or a half-open range
/// (`0..100` = 0 to 99), e.g. `0..10,20,30..32`. The order is kept; a repeated seed or an
/// empty range is an error.
pub fn parse_seeds(spec: &str) -> Result<Vec<u64>> {
    let number = |s: &str, part: &str| -> Result<u64> {
        s.trim().parse::<u64>().with_context(|| {
            format!("--seeds {spec:?}: {part:?} is not a seed or a range START..END (e.g. 0..100, 3,5,9)")
        })
    };
    let mut seeds = Vec::new();
    for part in spec.split(',') {
        let part = part.trim();
        match part.split_once("..") {
            Some((a, b)) => {
                let (lo, hi) = (number(a, part)?, number(b, part)?);
                if hi <= lo {
                    bail!("--seeds {spec:?}: the range {part:?} is empty (the end is exclusive)");
                }
                seeds.extend(lo..hi);
            }
            None => seeds.push(number(part, part)?),
        }
    }
    let mut sorted = seeds.clone();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        bail!("--seeds {spec:?}: seed {} appears twice", w[0]);
    }
    Ok(seeds)
}

/// A finished run's final evaluation (its line in `metrics.jsonl`).
#[derive(Clone, Debug, PartialEq)]
pub struct FinalEval {
    /// Updates of the run.
    pub step: u64,
    /// Top-1 accuracy in percent.
    pub top1: f64,
    /// Top-5 accuracy in percent.
    pub top5: f64,
    /// ReaL top-1 in percent, when the evaluation reported it.
    pub real_top1: Option<f64>,
}

/// Where a run directory stands.
#[derive(Clone, Debug, PartialEq)]
pub enum RunStatus {
    /// The schedule ran to its end and was evaluated.
    Finished(FinalEval),
    /// Anything else, with the reason in words.
    Unfinished {
        /// Why the run does not count as finished.
        reason: String,
        /// Whether `train --resume` can continue it (it has a checkpoint).
        resumable: bool,
    },
}

impl RunStatus {
    /// The final evaluation of a finished run.
    pub fn finished(&self) -> Option<&FinalEval> {
        match self {
            RunStatus::Finished(e) => Some(e),
            RunStatus::Unfinished { .. } => None,
        }
    }
}

/// Reads whether the run in `dir` is finished (see the module docs for the criterion).
pub fn run_status(dir: &Path) -> RunStatus {
    let unfinished = |reason: String, resumable| RunStatus::Unfinished { reason, resumable };
    let recipe_path = dir.join("recipe.toml");
    let recipe = match std::fs::read_to_string(&recipe_path) {
        Ok(text) => match Recipe::from_toml_str(&text) {
            Ok(r) => r,
            Err(e) => return unfinished(format!("{}: {e}", recipe_path.display()), false),
        },
        Err(_) => return unfinished("not started (no recipe.toml)".into(), false),
    };
    let total_epochs = (recipe.schedule.epochs + recipe.schedule.cooldown_epochs) as u64;
    let ck = match checkpoint::latest(&dir.join("checkpoints")) {
        Ok(ck) => ck,
        Err(CheckpointError::NoCheckpoint { .. }) => {
            return unfinished("no checkpoint yet".into(), false)
        }
        Err(e) => return unfinished(e.to_string(), false),
    };
    let (epoch, next_batch, step) = (
        ck.state.loader.epoch,
        ck.state.loader.next_batch,
        ck.state.step,
    );
    if epoch < total_epochs || next_batch != 0 {
        return unfinished(
            format!("stopped in epoch {epoch} of {total_epochs} (update {step})"),
            true,
        );
    }
    let metrics = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics).unwrap_or_default();
    let last = text
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l.get("top1").is_some() && l["step"].as_u64() == Some(step));
    let number = |l: &Value, k: &str| l.get(k).and_then(Value::as_f64);
    match last {
        Some(l) => match (number(&l, "top1"), number(&l, "top5")) {
            (Some(top1), Some(top5)) => RunStatus::Finished(FinalEval {
                step,
                top1,
                top5,
                real_top1: number(&l, "real_top1"),
            }),
            _ => unfinished(
                format!(
                    "{}: the final evaluation has no numeric top1/top5: {l}",
                    metrics.display()
                ),
                true,
            ),
        },
        None => unfinished(
            format!(
                "{}: no evaluation line at the final update {step}",
                metrics.display()
            ),
            true,
        ),
    }
}

/// Summary statistics of a sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stats {
    /// Number of values.
    pub n: usize,
    /// Their mean.
    pub mean: f64,
    /// Sample standard deviation (n - 1 in the denominator); `None` for one value.
    pub std: Option<f64>,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// The middle value, or the mean of the two middle values for an even count.
    pub median: f64,
}

impl Stats {
    /// The statistics of `values`; `None` if there are none.
    pub fn of(values: &[f64]) -> Option<Stats> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let mean = v.iter().sum::<f64>() / n as f64;
        let std = (n > 1).then(|| {
            (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1) as f64).sqrt()
        });
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Stats {
            n,
            mean,
            std,
            min: v[0],
            max: v[n - 1],
            median,
        })
    }

    /// As JSON, with the Gaussian fit (the normal curve of the mean and sample deviation).
    pub fn to_json(&self) -> Value {
        json!({
            "n": self.n, "mean": self.mean, "std": self.std, "min": self.min, "max": self.max,
            "median": self.median,
            "gaussian_fit": {"mean": self.mean, "std": self.std},
        })
    }
}

/// One run directory found by [`find_runs`].
#[derive(Clone, Debug, PartialEq)]
pub struct FoundRun {
    /// The run directory.
    pub dir: PathBuf,
    /// Its seed: `run.seed` of its `recipe.toml`, else from its name (`seed-N`).
    pub seed: Option<u64>,
    /// Where it stands.
    pub status: RunStatus,
}

/// Whether `dir` is a run directory (`train` wrote its `recipe.toml` or metrics there).
fn is_run(dir: &Path) -> bool {
    dir.join("recipe.toml").is_file() || dir.join("metrics.jsonl").is_file()
}

fn found(dir: PathBuf) -> FoundRun {
    let seed = std::fs::read_to_string(dir.join("recipe.toml"))
        .ok()
        .and_then(|t| Recipe::from_toml_str(&t).ok())
        .map(|r| r.run.seed)
        .or_else(|| seed_of_dir_name(&dir.file_name()?.to_string_lossy()));
    let status = run_status(&dir);
    FoundRun { dir, seed, status }
}

/// The runs of `dir`: `dir` itself if it is a run, else its subdirectories that are runs or
/// are named `seed-N` (a sweep's directory of a seed that never started), sorted by name.
pub fn find_runs(dir: &Path) -> Result<Vec<FoundRun>> {
    if is_run(dir) {
        return Ok(vec![found(dir.to_path_buf())]);
    }
    let mut dirs = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        let named = p
            .file_name()
            .and_then(|n| seed_of_dir_name(&n.to_string_lossy()))
            .is_some();
        if p.is_dir() && (named || is_run(&p)) {
            dirs.push(p);
        }
    }
    dirs.sort();
    Ok(dirs.into_iter().map(found).collect())
}

/// A seed study's report: the finished runs' final evaluations and their statistics.
#[derive(Clone, Debug)]
pub struct Report {
    /// Finished runs, by seed, then directory.
    pub finished: Vec<(FoundRun, FinalEval)>,
    /// Unfinished runs with their reasons.
    pub unfinished: Vec<(FoundRun, String)>,
}

impl Report {
    /// Sorts `runs` into finished and unfinished ones.
    pub fn new(runs: Vec<FoundRun>) -> Self {
        let (mut finished, mut unfinished) = (Vec::new(), Vec::new());
        for r in runs {
            match r.status.clone() {
                RunStatus::Finished(e) => finished.push((r, e)),
                RunStatus::Unfinished { reason, .. } => unfinished.push((r, reason)),
            }
        }
        finished.sort_by(|(a, _), (b, _)| (a.seed, &a.dir).cmp(&(b.seed, &b.dir)));
        Report {
            finished,
            unfinished,
        }
    }

    /// The finished runs' values of `metric` (top1, top5 or real_top1; real_top1 only from the
    /// runs that report it).
    pub fn values(&self, metric: &str) -> Vec<f64> {
        self.finished
            .iter()
            .filter_map(|(_, e)| match metric {
                "top1" => Some(e.top1),
                "top5" => Some(e.top5),
                "real_top1" => e.real_top1,
                _ => None,
            })
            .collect()
    }

    /// The metrics with at least one value: top1, top5, and real_top1 when reported.
    pub fn metrics(&self) -> Vec<&'static str> {
        ["top1", "top5", "real_top1"]
            .into_iter()
            .filter(|m| !self.values(m).is_empty() || *m != "real_top1")
            .collect()
    }

    /// Names of the unfinished runs (their directories as given).
    pub fn unfinished_names(&self) -> Vec<String> {
        self.unfinished
            .iter()
            .map(|(r, _)| r.dir.display().to_string())
            .collect()
    }

    /// The report as JSON (`sweep-report.json`).
    pub fn to_json(&self) -> Value {
        let runs: Vec<Value> = self
            .finished
            .iter()
            .map(|(r, e)| {
                json!({
                    "run": r.dir.display().to_string(), "seed": r.seed, "step": e.step,
                    "top1": e.top1, "top5": e.top5, "real_top1": e.real_top1,
                })
            })
            .collect();
        let unfinished: Vec<Value> = self
            .unfinished
            .iter()
            .map(|(r, why)| json!({"run": r.dir.display().to_string(), "seed": r.seed, "reason": why}))
            .collect();
        let mut v = json!({"runs": runs, "unfinished": unfinished});
        for m in self.metrics() {
            v[m] = Stats::of(&self.values(m)).map_or(Value::Null, |s| s.to_json());
        }
        v
    }

    /// The final line of `sweep-report`: top-1's statistics, the unfinished runs, and `extra`.
    pub fn summary_line(&self, extra: Value) -> Value {
        let s = Stats::of(&self.values("top1"));
        let mut v = json!({
            "metric": "top1",
            "n": s.map_or(0, |s| s.n),
            "mean": s.map(|s| s.mean), "std": s.and_then(|s| s.std),
            "min": s.map(|s| s.min), "max": s.map(|s| s.max), "median": s.map(|s| s.median),
            "unfinished": self.unfinished_names(),
        });
        if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
            o.extend(e);
        }
        v
    }

    /// The table `sweep-report` prints: one row per finished run, the statistics, then the
    /// unfinished runs with their reasons.
    pub fn table(&self) -> String {
        let metrics = self.metrics();
        let cell = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |x| format!("{x:.2}"));
        let mut t = String::new();
        let _ = write!(t, "{:>8}", "seed");
        for m in &metrics {
            let _ = write!(t, " {m:>10}");
        }
        let _ = writeln!(t, "  run");
        for (r, e) in &self.finished {
            let seed = r.seed.map_or_else(|| "-".into(), |s| s.to_string());
            let _ = write!(t, "{seed:>8}");
            for m in &metrics {
                let v = match *m {
                    "top1" => Some(e.top1),
                    "top5" => Some(e.top5),
                    _ => e.real_top1,
                };
                let _ = write!(t, " {:>10}", cell(v));
            }
            let _ = writeln!(t, "  {}", r.dir.display());
        }
        let stats: Vec<Option<Stats>> =
            metrics.iter().map(|m| Stats::of(&self.values(m))).collect();
        type Row = fn(&Stats) -> Option<f64>;
        let rows: [(&str, Row); 8] = [
            ("n", |s| Some(s.n as f64)),
            ("mean", |s| Some(s.mean)),
            ("std", |s| s.std),
            ("min", |s| Some(s.min)),
            ("median", |s| Some(s.median)),
            ("max", |s| Some(s.max)),
            ("fit mean", |s| Some(s.mean)),
            ("fit std", |s| s.std),
        ];
        for (name, f) in rows {
            let _ = write!(t, "{name:>8}");
            for s in &stats {
                let v = s.as_ref().and_then(f);
                if name == "n" {
                    let _ = write!(t, " {:>10}", s.map_or(0, |s| s.n));
                } else {
                    let _ = write!(t, " {:>10}", cell(v));
                }
            }
            let _ = writeln!(t);
        }
        if !self.unfinished.is_empty() {
            let _ = writeln!(t, "unfinished (not averaged):");
            for (r, why) in &self.unfinished {
                let _ = writeln!(t, "  {}: {why}", r.dir.display());
            }
        }
        t
    }
}

/// Quotes `s` for a POSIX shell when it needs it.
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_@%+=:,./-".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// What every seed's `train` gets: the recipe, the data, the sweep directory and the options
/// passed through.
#[derive(Clone, Debug)]
pub struct SweepPlan {
    /// The `train` executable.
    pub train_bin: PathBuf,
    /// `--recipe` (a preset or a file).
    pub recipe: String,
    /// `--data`.
    pub data: PathBuf,
    /// The sweep directory; seed N runs in `out/seed-000N`.
    pub out: PathBuf,
    /// Options passed to `train` verbatim.
    pub train_args: Vec<String>,
}

/// `train` options that the sweep sets itself for each seed.
const OWN_OPTIONS: &[&str] = &["--recipe", "--data", "--out", "--resume", "--eval-only"];

impl SweepPlan {
    /// Checks that the passed-through options leave the sweep's own to it.
    pub fn validate(&self) -> Result<()> {
        for (i, a) in self.train_args.iter().enumerate() {
            let name = a.split('=').next().unwrap_or(a);
            if OWN_OPTIONS.contains(&name) {
                bail!(
                    "train option {a:?} after `--`: sweep sets {} itself for each seed",
                    OWN_OPTIONS.join(", ")
                );
            }
            let set_value = match a.strip_prefix("--set=") {
                Some(v) => Some(v),
                None if a == "--set" => self.train_args.get(i + 1).map(String::as_str),
                None => None,
            };
            if set_value.is_some_and(|v| v.trim_start().starts_with("run.seed")) {
                bail!(
                    "train option --set run.seed after `--`: sweep sets each run's seed (--seeds)"
                );
            }
        }
        Ok(())
    }

    /// The run directory of `seed`.
    pub fn run_dir(&self, seed: u64) -> PathBuf {
        self.out.join(seed_dir_name(seed))
    }

    /// The `train` arguments of `seed` (continuing the run if `resume`).
    pub fn train_args(&self, seed: u64, resume: bool) -> Vec<OsString> {
        let mut v: Vec<OsString> = vec![
            "--recipe".into(),
            self.recipe.clone().into(),
            "--data".into(),
            self.data.clone().into(),
            "--out".into(),
            self.run_dir(seed).into(),
            "--set".into(),
            format!("run.seed={seed}").into(),
        ];
        v.extend(self.train_args.iter().map(OsString::from));
        if resume {
            v.push("--resume".into());
        }
        v
    }

    /// The command line of `seed` as a shell would take it.
    pub fn command_line(&self, seed: u64, resume: bool) -> String {
        std::iter::once(self.train_bin.clone().into_os_string())
            .chain(self.train_args(seed, resume))
            .map(|a| shell_quote(&a.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// A Slurm job-array script that runs `seeds` one per task (task i runs `seeds[i]`),
    /// resuming a seed whose run has a checkpoint; each run's output goes to its `train.log`.
    /// Paths are made absolute and the job runs in `workdir` (where relative options resolve).
    pub fn slurm_script(&self, seeds: &[u64], workdir: &Path) -> Result<String> {
        let abs = |p: &Path| -> Result<String> {
            let a = std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))?;
            Ok(shell_quote(&a.to_string_lossy()))
        };
        let recipe = if Recipe::PRESETS.contains(&self.recipe.as_str()) {
            self.recipe.clone()
        } else {
            abs(Path::new(&self.recipe))?
        };
        let out = abs(&self.out)?;
        let name = Path::new(&self.recipe)
            .file_stem()
            .map_or("sweep".into(), |s| s.to_string_lossy().into_owned());
        let mut s = String::new();
        let _ = writeln!(s, "#!/bin/bash");
        let _ = writeln!(
            s,
            "# Written by `sweep`: {} seed(s) of recipe {}, one per array task; submit with\n\
             # `sbatch {}/sweep.sbatch`, then `sweep-report {}`.",
            seeds.len(),
            self.recipe,
            out,
            out
        );
        let _ = writeln!(
            s,
            "#SBATCH --job-name={}",
            shell_quote(&format!("sweep-{name}"))
        );
        let _ = writeln!(s, "#SBATCH --array=0-{}", seeds.len().saturating_sub(1));
        let _ = writeln!(s, "#SBATCH --output={out}/slurm-%A_%a.out");
        let _ = writeln!(s, "#SBATCH --chdir={}", abs(workdir)?);
        let _ = writeln!(s, "set -euo pipefail");
        let list: Vec<String> = seeds.iter().map(u64::to_string).collect();
        let _ = writeln!(s, "SEEDS=({})", list.join(" "));
        let _ = writeln!(s, "SEED=${{SEEDS[$SLURM_ARRAY_TASK_ID]}}");
        let _ = writeln!(s, "RUN={out}/seed-$(printf %04d \"$SEED\")");
        let _ = writeln!(s, "RESUME=");
        let _ = writeln!(
            s,
            "if [ -f \"$RUN/checkpoints/latest\" ]; then RESUME=--resume; fi"
        );
        let _ = writeln!(s, "mkdir -p \"$RUN\"");
        let extra: Vec<String> = self.train_args.iter().map(|a| shell_quote(a)).collect();
        let extra = if extra.is_empty() {
            String::new()
        } else {
            format!(" {}", extra.join(" "))
        };
        let _ = writeln!(
            s,
            "{} --recipe {recipe} --data {} --out \"$RUN\" --set \"run.seed=$SEED\"{extra} $RESUME \\\n    >>\"$RUN/train.log\" 2>&1",
            abs(&self.train_bin)?,
            abs(&self.data)?,
        );
        Ok(s)
    }
}

/// How a seed's `train` ended.
#[derive(Debug)]
pub struct SeedOutcome {
    /// Whether it exited with status 0.
    pub success: bool,
    /// Its exit status, in words.
    pub status: String,
    /// Its error line (`train: error: ...`), or its last line of output.
    pub error: Option<String>,
}

/// Runs `train` for `seed` (resuming if `resume`): its standard output and error are appended to
/// `RUN/train.log`, and each line of its error output is also handed to `echo` as it comes.
pub fn run_seed(
    plan: &SweepPlan,
    seed: u64,
    resume: bool,
    echo: &mut dyn FnMut(&str),
) -> Result<SeedOutcome> {
    let dir = plan.run_dir(seed);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log_path = dir.join("train.log");
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let _ = writeln!(log, "# sweep: {}", plan.command_line(seed, resume));
    let stdout = log
        .try_clone()
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut child = Command::new(&plan.train_bin)
        .args(plan.train_args(seed, resume))
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", plan.train_bin.display()))?;
    let stderr = child.stderr.take().expect("piped");
    let (mut error, mut last) = (None, None);
    for line in BufReader::new(stderr).lines() {
        let line = line.with_context(|| format!("reading the output of seed {seed}"))?;
        let _ = writeln!(log, "{line}");
        echo(&line);
        if line.contains("error:") {
            error = Some(line.clone());
        }
        if !line.trim().is_empty() {
            last = Some(line);
        }
    }
    let status = child.wait().context("waiting for train")?;
    Ok(SeedOutcome {
        success: status.success(),
        status: status.to_string(),
        error: error.or(last),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_parse_ranges_lists_and_combinations() {
        assert_eq!(parse_seeds("0..3").unwrap(), vec![0, 1, 2]);
        assert_eq!(parse_seeds("3,5,9").unwrap(), vec![3, 5, 9]);
        assert_eq!(parse_seeds("7").unwrap(), vec![7]);
        assert_eq!(
            parse_seeds("0..2, 10 ,20..22").unwrap(),
            vec![0, 1, 10, 20, 21]
        );
        assert_eq!(parse_seeds("0..100").unwrap().len(), 100);
        let e = |s: &str| parse_seeds(s).unwrap_err().to_string();
        assert!(
            e("0..3,2").contains("seed 2 appears twice"),
            "{}",
            e("0..3,2")
        );
        assert!(e("5..5").contains("is empty"), "{}", e("5..5"));
        assert!(
            e("a..3").contains("\"a..3\" is not a seed"),
            "{}",
            e("a..3")
        );
        assert!(e("").contains("is not a seed"), "{}", e(""));
        assert!(e("1,,2").contains("is not a seed"), "{}", e("1,,2"));
    }

    #[test]
    fn seed_dir_names_round_trip() {
        assert_eq!(seed_dir_name(7), "seed-0007");
        assert_eq!(seed_dir_name(12345), "seed-12345");
        assert_eq!(seed_of_dir_name("seed-0007"), Some(7));
        assert_eq!(seed_of_dir_name("seed-12345"), Some(12345));
        assert_eq!(seed_of_dir_name("seed-"), None);
        assert_eq!(seed_of_dir_name("seed-x1"), None);
        assert_eq!(seed_of_dir_name("run-1"), None);
    }

    #[test]
    fn statistics_match_known_values() {
        // Odd n: 2 4 4 4 5 5 7 (unsorted): sum 31, sum of squares 151, so the squared
        // deviations sum to 151 - 31^2 / 7.
        let s = Stats::of(&[4.0, 2.0, 7.0, 4.0, 5.0, 4.0, 5.0]).unwrap();
        assert_eq!((s.n, s.min, s.max, s.median), (7, 2.0, 7.0, 4.0));
        assert!((s.mean - 31.0 / 7.0).abs() < 1e-12);
        let ss: f64 = 151.0 - 961.0 / 7.0;
        assert!((s.std.unwrap() - (ss / 6.0).sqrt()).abs() < 1e-12);
        // Even n: the classic 2 4 4 4 5 5 7 9 (mean 5, population std 2, sample sqrt(32/7)).
        let s = Stats::of(&[9.0, 2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0]).unwrap();
        assert_eq!((s.n, s.mean, s.min, s.max), (8, 5.0, 2.0, 9.0));
        assert_eq!(s.median, 4.5);
        assert!((s.std.unwrap() - (32.0f64 / 7.0).sqrt()).abs() < 1e-12);
        // Two values: the median is their mean; one value: no deviation; none: nothing.
        let s = Stats::of(&[78.5, 79.5]).unwrap();
        assert_eq!((s.median, s.mean), (79.0, 79.0));
        assert!((s.std.unwrap() - 0.5f64.sqrt()).abs() < 1e-12);
        let s = Stats::of(&[80.25]).unwrap();
        assert_eq!((s.n, s.mean, s.std, s.median), (1, 80.25, None, 80.25));
        assert_eq!(Stats::of(&[]), None);
        let j = Stats::of(&[1.0, 3.0]).unwrap().to_json();
        assert_eq!(j["gaussian_fit"]["mean"], 2.0);
        assert_eq!(j["std"], j["gaussian_fit"]["std"]);
    }

    #[test]
    fn shell_quoting_leaves_plain_words_alone() {
        assert_eq!(shell_quote("optim.lr=0.001"), "optim.lr=0.001");
        assert_eq!(shell_quote("/a/b-c"), "/a/b-c");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(
            shell_quote("augment.rand_augment=\"\""),
            "'augment.rand_augment=\"\"'"
        );
    }

    fn plan(extra: &[&str]) -> SweepPlan {
        SweepPlan {
            train_bin: "/bin/train".into(),
            recipe: "a2".into(),
            data: "/data/shards".into(),
            out: "/runs/sweep".into(),
            train_args: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn commands_set_the_seed_and_pass_options_through() {
        let p = plan(&["--epochs", "2", "--set", "optim.lr=0.001"]);
        assert_eq!(
            p.command_line(7, false),
            "/bin/train --recipe a2 --data /data/shards --out /runs/sweep/seed-0007 --set \
             run.seed=7 --epochs 2 --set optim.lr=0.001"
        );
        assert!(p.command_line(7, true).ends_with(" --resume"));
        p.validate().unwrap();
        for bad in [
            &["--out", "x"][..],
            &["--resume"],
            &["--data=x"],
            &["--set", "run.seed=3"],
            &["--set=run.seed=3"],
        ] {
            let e = plan(bad).validate().unwrap_err().to_string();
            assert!(e.contains("sweep sets"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn the_slurm_script_runs_one_seed_per_task() {
        let p = plan(&["--set", "optim.lr=1e-3 "]);
        let s = p.slurm_script(&[3, 5, 9], Path::new("/work")).unwrap();
        assert!(s.starts_with("#!/bin/bash\n"), "{s}");
        assert!(s.contains("\n#SBATCH --array=0-2\n"), "{s}");
        assert!(s.contains("\n#SBATCH --chdir=/work\n"), "{s}");
        assert!(
            s.contains("\nSEEDS=(3 5 9)\nSEED=${SEEDS[$SLURM_ARRAY_TASK_ID]}\n"),
            "{s}"
        );
        assert!(
            s.contains("\nRUN=/runs/sweep/seed-$(printf %04d \"$SEED\")\n"),
            "{s}"
        );
        assert!(
            s.contains(
                "\n/bin/train --recipe a2 --data /data/shards --out \"$RUN\" --set \
                 \"run.seed=$SEED\" --set 'optim.lr=1e-3 ' $RESUME"
            ),
            "{s}"
        );
    }

    fn finished(dir: &str, seed: u64, top1: f64) -> FoundRun {
        FoundRun {
            dir: dir.into(),
            seed: Some(seed),
            status: RunStatus::Finished(FinalEval {
                step: 10,
                top1,
                top5: 99.0,
                real_top1: None,
            }),
        }
    }

    #[test]
    fn unfinished_runs_are_listed_not_averaged() {
        let runs = vec![
            finished("s/seed-0002", 2, 80.0),
            FoundRun {
                dir: "s/seed-0001".into(),
                seed: Some(1),
                status: RunStatus::Unfinished {
                    reason: "stopped in epoch 1 of 2 (update 4)".into(),
                    resumable: true,
                },
            },
            finished("s/seed-0000", 0, 78.0),
        ];
        let r = Report::new(runs);
        assert_eq!(r.values("top1"), vec![78.0, 80.0], "sorted by seed");
        assert_eq!(r.metrics(), vec!["top1", "top5"], "no real_top1 reported");
        let j = r.to_json();
        assert_eq!(j["top1"]["n"], 2);
        assert_eq!(j["top1"]["mean"], 79.0);
        assert_eq!(j["unfinished"][0]["run"], "s/seed-0001");
        let line = r.summary_line(json!({"report": "x.json"}));
        assert_eq!(
            (
                &line["n"],
                &line["mean"],
                &line["min"],
                &line["max"],
                &line["median"]
            ),
            (
                &2.into(),
                &79.0.into(),
                &78.0.into(),
                &80.0.into(),
                &79.0.into()
            )
        );
        assert_eq!(line["unfinished"], json!(["s/seed-0001"]));
        assert_eq!(line["report"], "x.json");
        let t = r.table();
        assert!(
            t.contains("unfinished (not averaged):\n  s/seed-0001: stopped in epoch 1"),
            "{t}"
        );
        assert!(t.contains("    mean      79.00      99.00"), "{t}");
    }
}
