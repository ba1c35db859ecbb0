//! `sweep` and `sweep-report` end to end: tiny CPU runs of a few seconds each, skipped when
//! finished, resumed when not; the report's statistics over the finished runs only; dry runs,
//! Slurm job arrays and a failing seed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::SystemTime;

const SWEEP: &str = env!("CARGO_BIN_EXE_sweep");
const REPORT: &str = env!("CARGO_BIN_EXE_sweep-report");
const TRAIN: &str = env!("CARGO_BIN_EXE_train");

/// `train` options of a run of about 2 s: ResNet-18 at 32 px, 3 updates of 2 micro-batches of
/// 4, one epoch, a checkpoint after every update.
const TINY: &[&str] = &[
    "--model",
    "resnet18",
    "--epochs",
    "1",
    "--batch-size",
    "8",
    "--micro-batch",
    "4",
    "--size",
    "32",
    "--workers",
    "1",
    "--set",
    "data.test_size_px=32",
    "--set",
    "schedule.warmup_epochs=0",
    "--set",
    "run.checkpoint_every_steps=1",
];

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// 3 classes x 8 training images (2 validation each), sharded into `dir/shards`.
fn tiny_shards(dir: &Path) -> PathBuf {
    tools::synth::small_shard_set(dir, 3, 8, 2, 1).unwrap()
}

/// `sweep --recipe a3 --seeds SEEDS --data DATA --out OUT EXTRA... -- TINY`.
fn sweep(data: &Path, out: &Path, seeds: &str, extra: &[&str]) -> Output {
    Command::new(SWEEP)
        .args(["--recipe", "a3", "--seeds", seeds, "--data"])
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(extra)
        .arg("--")
        .args(TINY)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> (String, String) {
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "stdout:\n{so}\nstderr:\n{se}");
    (so, se)
}

/// Every file under `dir` with its modification time and contents.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (SystemTime, Vec<u8>)> {
    tools::files_under(dir)
        .unwrap()
        .into_iter()
        .map(|p| {
            let t = std::fs::metadata(&p).unwrap().modified().unwrap();
            let bytes = std::fs::read(&p).unwrap();
            (p, (t, bytes))
        })
        .collect()
}

/// The top-1 of the last evaluation line of a run's metrics.
fn final_top1(run: &Path) -> f64 {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .rev()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|l| l.get("top1").is_some())
        .unwrap()["top1"]
        .as_f64()
        .unwrap()
}

/// `sweep-report DIR`: (stdout, its last line as JSON).
fn report(dir: &Path) -> (String, serde_json::Value) {
    let out = Command::new(REPORT).arg(dir).output().unwrap();
    let (so, _) = ok(&out);
    let last = so.lines().last().unwrap();
    (so.clone(), serde_json::from_str(last).unwrap())
}

#[test]
fn a_sweep_trains_each_seed_skips_finished_ones_resumes_the_rest_and_reports() {
    let t0 = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_shards(dir.path());
    let out = dir.path().join("sweep");

    let (so, se) = ok(&sweep(&data, &out, "0..2,5", &[]));
    for (i, seed) in [0, 1, 5].into_iter().enumerate() {
        let run = format!("seed-{seed:04}");
        assert!(
            se.contains(&format!("sweep: seed {seed} [{}/3]: training -> ", i + 1)),
            "{se}"
        );
        assert!(
            se.contains(&format!("[seed {seed}] epoch 0 eval: top1")),
            "{se}"
        );
        assert!(out.join(&run).join("train.log").is_file());
        assert!(out.join(&run).join("plot.png").is_file());
    }
    assert!(se.contains("(3 run, 0 skipped, 0 left)"), "{se}");
    let line: serde_json::Value = serde_json::from_str(so.lines().last().unwrap()).unwrap();
    assert_eq!(
        (line["run"].clone(), line["skipped"].clone()),
        (3.into(), 0.into())
    );
    let first_s = t0.elapsed().as_secs_f64();

    // Seed 5 stopped after its first update: its latest checkpoint is step 1, mid-epoch.
    let seed5 = out.join("seed-0005");
    let top1_5 = final_top1(&seed5);
    std::fs::write(seed5.join("checkpoints/latest"), "step-1\n").unwrap();

    // The report averages seeds 0 and 1 and lists seed 5.
    let (table, line) = report(&out);
    let (a, b) = (
        final_top1(&out.join("seed-0000")),
        final_top1(&out.join("seed-0001")),
    );
    assert_eq!(line["n"], 2, "{table}");
    assert_eq!(line["mean"].as_f64().unwrap(), (a + b) / 2.0);
    assert_eq!(line["min"].as_f64().unwrap(), a.min(b));
    assert_eq!(line["max"].as_f64().unwrap(), a.max(b));
    assert_eq!(line["median"].as_f64().unwrap(), (a + b) / 2.0);
    let std = ((a - b) * (a - b) / 2.0).sqrt();
    assert!(
        (line["std"].as_f64().unwrap() - std).abs() < 1e-12,
        "{line}"
    );
    let unfinished = seed5.display().to_string();
    assert_eq!(line["unfinished"], serde_json::json!([unfinished]));
    assert!(
        table.contains(&format!(
            "unfinished (not averaged):\n  {unfinished}: stopped in epoch 0 of 1 (update 1)"
        )),
        "{table}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("sweep-report.json")).unwrap()).unwrap();
    assert_eq!(json["top1"]["n"], 2);
    assert_eq!(json["runs"][1]["seed"], 1);
    assert_eq!(json["runs"][1]["top1"].as_f64().unwrap(), b);
    assert!(json["real_top1"].is_null(), "no ReaL labels here: {json}");
    assert!(out.join("sweep-report.png").is_file());

    // A rerun skips seeds 0 and 1 without touching their files and resumes seed 5, which
    // ends where the uninterrupted run ended.
    let before = [
        snapshot(&out.join("seed-0000")),
        snapshot(&out.join("seed-0001")),
    ];
    let (_, se) = ok(&sweep(&data, &out, "0..2,5", &["--quiet"]));
    for seed in [0, 1] {
        assert!(
            se.contains(&format!(
                "sweep: seed {seed} [{}/3]: finished already",
                seed + 1
            )),
            "{se}"
        );
    }
    assert!(se.contains("sweep: seed 5 [3/3]: resuming -> "), "{se}");
    assert!(
        !se.contains("[seed 5]"),
        "--quiet keeps the run's lines in its log: {se}"
    );
    assert!(se.contains("(1 run, 2 skipped, 0 left)"), "{se}");
    let after = [
        snapshot(&out.join("seed-0000")),
        snapshot(&out.join("seed-0001")),
    ];
    assert!(before == after, "a skipped seed's files were rewritten");
    assert_eq!(
        final_top1(&seed5),
        top1_5,
        "the resumed run ends as the first one did"
    );
    let log = std::fs::read_to_string(seed5.join("train.log")).unwrap();
    assert!(log.contains("resumed at update 1"), "{log}");
    let (_, line) = report(&out);
    assert_eq!(
        (line["n"].clone(), line["unfinished"].clone()),
        (3.into(), serde_json::json!([]))
    );

    // A job array of the seeds not finished (only 7); run its one task as Slurm would.
    let (_, se) = ok(&sweep(&data, &out, "0..2,5,7", &["--slurm-array"]));
    assert!(se.contains("(3 finished seed(s) left out)"), "{se}");
    let script = out.join("sweep.sbatch");
    let s = std::fs::read_to_string(&script).unwrap();
    assert!(
        s.contains("\n#SBATCH --array=0-0\n") && s.contains("\nSEEDS=(7)\n"),
        "{s}"
    );
    let task = Command::new("bash")
        .arg(&script)
        .env("SLURM_ARRAY_TASK_ID", "0")
        .output()
        .unwrap();
    ok(&task);
    let (_, line) = report(&out);
    assert_eq!(line["n"], 4, "{line}");
    eprintln!(
        "first sweep (3 seeds) {first_s:.1} s, whole test {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn a_dry_run_prints_one_command_per_seed_and_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sweep");
    let data = dir.path().join("shards");
    let (so, _) = ok(&sweep(&data, &out, "3,5,9,10..12", &["--dry-run"]));
    let lines: Vec<&str> = so.lines().collect();
    assert_eq!(lines.len(), 5, "{so}");
    for (line, seed) in lines.iter().zip([3, 5, 9, 10, 11]) {
        let run = out.join(format!("seed-{seed:04}"));
        assert!(line.starts_with(TRAIN), "{line}");
        assert!(
            line.contains(&format!(
                " --out {} --set run.seed={seed} --model resnet18 ",
                run.display()
            )),
            "{line}"
        );
        assert!(
            line.ends_with("--set run.checkpoint_every_steps=1"),
            "{line}"
        );
    }
    assert!(!out.exists(), "a dry run writes nothing");
}

#[test]
fn a_slurm_array_covers_every_seed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sweep");
    let data = dir.path().join("shards");
    let (so, _) = ok(&sweep(&data, &out, "0..100", &["--slurm-array"]));
    let line: serde_json::Value = serde_json::from_str(so.trim()).unwrap();
    assert_eq!(line["tasks"], 100);
    let s = std::fs::read_to_string(out.join("sweep.sbatch")).unwrap();
    let seeds: Vec<String> = (0..100).map(|s| s.to_string()).collect();
    assert!(s.starts_with("#!/bin/bash\n"), "{s}");
    assert!(s.contains("\n#SBATCH --array=0-99\n"), "{s}");
    assert!(
        s.contains(&format!("\nSEEDS=({})\n", seeds.join(" "))),
        "{s}"
    );
    assert!(s.contains("\nSEED=${SEEDS[$SLURM_ARRAY_TASK_ID]}\n"), "{s}");
    assert!(
        s.contains(&format!(
            "\n{TRAIN} --recipe a3 --data {} --out \"$RUN\" --set \"run.seed=$SEED\" --model \
             resnet18 ",
            data.display()
        )),
        "{s}"
    );
}

#[test]
fn the_first_failing_seed_stops_the_sweep_with_its_error_and_log() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sweep");
    let res = sweep(&dir.path().join("no-shards"), &out, "4..6", &["--quiet"]);
    let se = text(&res.stderr);
    assert_eq!(res.status.code(), Some(2), "{se}");
    let log = out.join("seed-0004/train.log");
    assert!(
        se.contains("sweep: error: seed 4 failed (exit status: 2): train: error:")
            && se.contains(&format!("log: {}", log.display())),
        "{se}"
    );
    assert!(!se.contains("seed 5"), "stopped at seed 4: {se}");
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("train: error:"));

    // Seeds and passed-through options the sweep owns are refused up front.
    let res = sweep(&dir.path().join("no-shards"), &out, "1..1", &[]);
    assert!(text(&res.stderr).contains("the range \"1..1\" is empty"));
    let res = Command::new(SWEEP)
        .args(["--recipe", "a3", "--seeds", "0", "--data", "d", "--out"])
        .arg(&out)
        .args(["--", "--set", "run.seed=3"])
        .output()
        .unwrap();
    assert!(
        text(&res.stderr).contains("sweep sets each run's seed"),
        "{}",
        text(&res.stderr)
    );
}
