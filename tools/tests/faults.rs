//! Faults on a real `train` process: killed with SIGKILL six times, alternately at a seeded
//! random moment (within two updates' time of the attempt's first update) and in the middle of a checkpoint write (as soon as a `.tmp` file appears in
//! `checkpoints/`; `RSB_FAULT_CHECKPOINT_PAUSE_MS` holds each file there for 200 ms, since a
//! small model's files are written in milliseconds), and resumed each time with `--resume`, a run ends with the weights,
//! optimizer state and metrics lines of an uninterrupted run, bit for bit; after every kill,
//! `checkpoints/latest` names a complete checkpoint that loads.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TRAIN: &str = env!("CARGO_BIN_EXE_train");

/// ResNet-18 at 32 px, 3 classes x 12 images, batches of 8 in micro-batches of 4, 4 epochs
/// (4 updates each), a checkpoint after every update, drop path on (its per-step seeds are
/// part of the state).
const RUN: &[&str] = &[
    "--recipe",
    "a3",
    "--model",
    "resnet18",
    "--epochs",
    "4",
    "--batch-size",
    "8",
    "--micro-batch",
    "4",
    "--size",
    "32",
    "--workers",
    "2",
    "--no-bar",
    "--set",
    "data.test_size_px=32",
    "--set",
    "schedule.warmup_epochs=1",
    "--set",
    "model.drop_path_rate=0.1",
    "--set",
    "run.checkpoint_every_steps=1",
    "--set",
    "run.log_every_steps=1",
];

/// Metrics fields that measure time or the process, not the run.
const TIMING: &[&str] = &[
    "images_per_s",
    "data_wait_s",
    "loader_wait_frac",
    "eval_s",
    "rss_bytes",
];

fn shards(dir: &Path) -> PathBuf {
    tools::synth::small_shard_set(dir, 3, 12, 2, 3).unwrap()
}

fn train(data: &Path, out: &Path, resume: bool) -> Command {
    let mut c = Command::new(TRAIN);
    c.args(RUN).arg("--data").arg(data).arg("--out").arg(out);
    if resume {
        c.arg("--resume");
    }
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

/// The metrics lines without their timing fields.
fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: line {l:?}: {e}", run.display()));
            for k in TIMING {
                v.as_object_mut().unwrap().remove(*k);
            }
            v
        })
        .collect()
}

/// `checkpoints/latest` names a checkpoint whose sidecar, weights and optimizer state read.
fn check_latest_loads(run: &Path) {
    let dir = run.join("checkpoints");
    if !dir.join("latest").exists() {
        return;
    }
    let ck = trainer::checkpoint::latest(&dir)
        .unwrap_or_else(|e| panic!("after a kill, latest does not load: {e}"));
    for p in [&ck.weights_path, &ck.optimizer_path] {
        candle_core::safetensors::load(p, &candle_core::Device::Cpu)
            .unwrap_or_else(|e| panic!("after a kill, {} does not load: {e}", p.display()));
    }
}

/// Waits until `checkpoints/latest` exists (the first checkpoint is complete).
fn wait_for_latest(run: &Path, child: &mut std::process::Child) {
    let t0 = Instant::now();
    while !run.join("checkpoints/latest").exists() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no checkpoint after 120 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn signal(child: &std::process::Child, signal: i32) {
    // SAFETY: kill(2) on a child of this process that has not been reaped.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
}

/// Complete lines in the run's metrics file (0 if there is none).
fn metrics_lines(run: &Path) -> usize {
    std::fs::read(run.join("metrics.jsonl"))
        .map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count())
}

/// Limits the size of any file `cmd` writes to `bytes` (RLIMIT_FSIZE), with SIGXFSZ ignored so
/// that a write beyond it fails with EFBIG ("File too large") instead of killing the process:
/// a full disk without root.
fn fsize_limit(cmd: &mut Command, bytes: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only async-signal-safe calls: signal(2), setrlimit(2).
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Kills before the run is left to finish.
const KILLS: usize = 6;

/// Whether a checkpoint file is being written (`train` writes each under a `.tmp` name, then
/// renames it).
fn writing(run: &Path) -> bool {
    std::fs::read_dir(run.join("checkpoints")).is_ok_and(|d| {
        d.flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
    })
}

/// A 64-bit LCG (Knuth's constants): the kill moments are a function of the seed.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
fn killed_runs_resume_to_the_bits_of_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = shards(dir.path());
    let straight = dir.path().join("straight");
    let t0 = Instant::now();
    let out = train(&data, &straight, false).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let straight_ms = t0.elapsed().as_millis() as u64;

    let killed = dir.path().join("killed");
    let mut rng = Lcg(0x5eed);
    let mut kills = 0;
    let mut attempts = 0;
    loop {
        attempts += 1;
        assert!(attempts < 40, "the run never finished between kills");
        let resume = killed.join("checkpoints/latest").exists();
        let mut cmd = train(&data, &killed, resume);
        if kills < KILLS && kills % 2 == 1 {
            // Long enough a window to see the `.tmp` file and kill inside it.
            cmd.env("RSB_FAULT_CHECKPOINT_PAUSE_MS", "200");
        }
        let mut child = cmd.spawn().unwrap();
        // Kills 1, 3, 5 at a seeded moment within two updates' time after the attempt's first
        // update (so each attempt makes progress and the run outlasts the kills); kills 2, 4, 6
        // while a checkpoint is being written; then the run is left to finish.
        let timed = kills < KILLS && kills % 2 == 0;
        let in_write = kills < KILLS && kills % 2 == 1;
        let delay = Duration::from_millis(rng.below((2 * straight_ms / 16).max(1)));
        let lines_before = metrics_lines(&killed);
        let mut progressed: Option<Instant> = None;
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if timed && progressed.is_none() && metrics_lines(&killed) > lines_before {
                progressed = Some(Instant::now());
            }
            let due = progressed.is_some_and(|t| t.elapsed() >= delay);
            if due || (in_write && writing(&killed)) {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                break None;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        match status {
            None => {
                kills += 1;
                check_latest_loads(&killed);
                let dir = killed.join("checkpoints");
                let latest = std::fs::read_to_string(dir.join("latest")).unwrap_or_default();
                let partial = std::fs::read_dir(&dir).map_or(0, |d| {
                    d.filter(|e| {
                        let name = e.as_ref().unwrap().file_name();
                        name.to_string_lossy().ends_with(".tmp")
                    })
                    .count()
                });
                eprintln!(
                    "kill {kills} at {:?}: latest {:?}, {partial} partial checkpoint file(s)",
                    start.elapsed(),
                    latest.trim()
                );
            }
            Some(s) => {
                let mut err = String::new();
                std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
                assert!(s.success(), "attempt {attempts}: {err}");
                break;
            }
        }
    }
    assert_eq!(kills, KILLS, "the run finished before every kill");

    let ck = |d: &Path, f: &str| d.join("checkpoints").join(f);
    let last = std::fs::read_to_string(ck(&straight, "latest")).unwrap();
    let last = last.trim();
    assert_eq!(
        std::fs::read_to_string(ck(&killed, "latest"))
            .unwrap()
            .trim(),
        last
    );
    for f in [
        format!("{last}.safetensors"),
        format!("{last}.optim.safetensors"),
    ] {
        assert!(
            std::fs::read(ck(&straight, &f)).unwrap() == std::fs::read(ck(&killed, &f)).unwrap(),
            "{f} differs after {kills} kills"
        );
    }
    let (a, b) = (metrics(&straight), metrics(&killed));
    assert_eq!(a.len(), b.len(), "metrics lines after {kills} kills");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(x, y, "metrics line {i} after {kills} kills");
    }

    // Retention: the default --keep-checkpoints 3 left the newest three.
    let sidecars = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d.join("checkpoints"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".json"))
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        sidecars(&straight),
        ["step-14.json", "step-15.json", "step-16.json"]
    );

    // SIGTERM: the update finishes, a checkpoint and a metrics line saying why are written, the
    // exit code is 75; --resume then ends where the uninterrupted run did.
    let termed = dir.path().join("termed");
    let mut child = train(&data, &termed, false).spawn().unwrap();
    wait_for_latest(&termed, &mut child);
    signal(&child, libc::SIGTERM);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(err.contains("stopped by SIGTERM"), "{err}");
    let lines = metrics(&termed);
    let stop = lines.last().unwrap();
    assert_eq!(stop["stopped"], "SIGTERM");
    let latest = std::fs::read_to_string(termed.join("checkpoints/latest")).unwrap();
    assert_eq!(stop["checkpoint"].as_str().unwrap(), latest.trim());
    assert!(
        stop["step"].as_u64().unwrap() < 16,
        "stopped before the end"
    );
    check_latest_loads(&termed);

    // A file-size limit (RLIMIT_FSIZE, as a full disk) hit by the resumed run's first checkpoint:
    // a clear error naming the file, and `latest` still names the stop's checkpoint, which loads.
    let mut cmd = train(&data, &termed, true);
    fsize_limit(&mut cmd, 1 << 20);
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(".safetensors.tmp") && err.contains("File too large"),
        "{err}"
    );
    let after = std::fs::read_to_string(termed.join("checkpoints/latest")).unwrap();
    assert_eq!(after, latest, "latest unchanged");
    check_latest_loads(&termed);

    let out = train(&data, &termed, true).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f = format!("{last}.safetensors");
    assert!(std::fs::read(ck(&straight, &f)).unwrap() == std::fs::read(ck(&termed, &f)).unwrap());
    let without_stop: Vec<_> = metrics(&termed)
        .into_iter()
        .filter(|l| l.get("stopped").is_none())
        .collect();
    assert_eq!(
        without_stop, a,
        "the same lines, and one saying why the run stopped"
    );

    // A second signal while the stop's checkpoint is written exits at once (128 + SIGINT);
    // `latest` still names a complete checkpoint.
    let twice = dir.path().join("twice");
    // Checkpoints at epoch ends only, so the stop writes its own; the first signal comes after
    // an update past the first checkpoint (not between that checkpoint and the stop check that
    // follows it, where the stop would write nothing new).
    let mut cmd = train(&data, &twice, false);
    cmd.args(["--set", "run.checkpoint_every_steps=0"]);
    cmd.env("RSB_FAULT_CHECKPOINT_PAUSE_MS", "300");
    let mut child = cmd.spawn().unwrap();
    wait_for_latest(&twice, &mut child);
    let lines = metrics_lines(&twice);
    while metrics_lines(&twice) == lines {
        assert!(
            child.try_wait().unwrap().is_none(),
            "ended before the first signal"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    signal(&child, libc::SIGINT);
    let t0 = Instant::now();
    while !writing(&twice) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "ended before the second signal"
        );
        assert!(t0.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(1));
    }
    signal(&child, libc::SIGINT);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGINT));
    check_latest_loads(&twice);
}

/// Divergence: with an absurd learning rate the loss turns non-finite and stays so; after
/// `--max-nonfinite-updates 3` such updates the run stops (exit 2) with a message saying so,
/// and `latest` names the last checkpoint written before them.
#[test]
fn a_diverged_run_stops_at_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = shards(dir.path());
    let run = dir.path().join("run");
    let out = train(&data, &run, false)
        .args(["--set", "optim.lr=1e30", "--max-nonfinite-updates", "3"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("was not finite for 3 consecutive updates"),
        "{err}"
    );
    let first: u64 = err
        .split("(updates ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no first update in {err}"));
    let latest = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    let step: u64 = latest
        .trim()
        .strip_prefix("step-")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        step < first,
        "latest {latest:?} is not before update {first}"
    );
    assert!(err.contains(&format!("names {}", latest.trim())), "{err}");
    check_latest_loads(&run);
}

/// `shard-imagenet` under a file-size limit smaller than a shard (RLIMIT_FSIZE, as a full disk):
/// exit 2 with an error naming the file, no manifest, and no shard under its final name.
#[test]
fn a_full_disk_while_sharding_leaves_nothing_that_looks_complete() {
    let dir = tempfile::tempdir().unwrap();
    // The generated folder of `small_shard_set`, sharded again here under the limit.
    tools::synth::small_shard_set(dir.path(), 3, 12, 2, 3).unwrap();
    let src = dir.path().join("src");
    let dst = dir.path().join("limited");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shard-imagenet"));
    cmd.arg(&src)
        .arg(&dst)
        .args(["--shard-bytes", "300000", "-q"]);
    fsize_limit(&mut cmd, 64 << 10);
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("File too large"), "{err}");
    assert!(!dst.join("manifest.json").exists());
    for f in tools::files_under(&dst).unwrap() {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !name.ends_with(".tar") && !name.ends_with(".idx"),
            "{name} looks complete"
        );
    }
    // Without the limit, the same command completes the set.
    let out = Command::new(env!("CARGO_BIN_EXE_shard-imagenet"))
        .arg(&src)
        .arg(&dst)
        .args(["--shard-bytes", "300000", "-q"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dst.join("manifest.json").exists());
}
