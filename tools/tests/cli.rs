//! The command-line contract: exit codes, one-line errors, and recovery from an interrupted run.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

const SHARD: &str = env!("CARGO_BIN_EXE_shard-imagenet");
const MAKE: &str = env!("CARGO_BIN_EXE_make-imagenet-like");

fn run(bin: &str, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut c = Command::new(bin);
    c.args(args);
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().expect("running the binary")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn make(dir: &Path, extra: &[&str]) -> String {
    let src = dir.join("src").to_string_lossy().into_owned();
    let mut args = vec![
        src.as_str(),
        "--classes",
        "3",
        "--per-class",
        "10",
        "--seed",
        "1",
    ];
    args.extend_from_slice(extra);
    let out = run(MAKE, &args, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    src
}

fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    tools::files_under(dir)
        .unwrap()
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            (rel, std::fs::read(&p).unwrap())
        })
        .collect()
}

/// `shard-imagenet SRC DST --shard-bytes 300000 --threads T -q`.
fn shard_args(src: &str, dst: &Path, threads: usize) -> Vec<String> {
    [
        src,
        &dst.to_string_lossy(),
        "--shard-bytes",
        "300000",
        "--threads",
        &threads.to_string(),
        "-q",
    ]
    .map(str::to_owned)
    .to_vec()
}

fn run_args(args: &[String], envs: &[(&str, &str)]) -> Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run(SHARD, &args, envs)
}

/// Aborts the run (no unwinding, no cleanup) after 14 samples and checks that no half-written
/// shard has its final name and no manifest exists. Which shards are finished, half written or
/// not started depends on the scheduling of the per-shard writer threads. Returns the number of
/// finished shards (those whose state file is written, after their renames).
fn abort_after_14(args: &[String], dst: &Path) -> usize {
    let out = run_args(args, &[("SHARD_IMAGENET_ABORT_AFTER_SAMPLES", "14")]);
    assert!(!out.status.success());
    let files = tree(dst);
    let partial: Vec<&String> = files.keys().filter(|k| k.ends_with(".tar.tmp")).collect();
    // The writer that aborted had its shard open: at least that one is half written.
    assert!(!partial.is_empty(), "{:?}", files.keys());
    assert!(!files.contains_key("manifest.json"));
    for p in partial {
        let final_name = p.trim_end_matches(".tmp");
        assert!(
            !files.contains_key(final_name),
            "{final_name} must not exist yet"
        );
    }
    files
        .keys()
        .filter(|k| k.starts_with(".shard-imagenet/") && k.ends_with(".json"))
        .count()
}

#[test]
fn interrupted_run_leaves_no_whole_looking_shard_and_a_rerun_completes_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = make(dir.path(), &[]);
    let dst = dir.path().join("dst");
    let dst_s = dst.to_string_lossy().into_owned();
    let args = shard_args(&src, &dst, 1);
    let finished_before = abort_after_14(&args, &dst);

    // Nothing passes verify: there is no manifest to vouch for any shard.
    let out = run(SHARD, &["verify", &dst_s], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.starts_with("shard-imagenet: error: ") && err.contains("manifest.json"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    // The same command again finishes the job, reusing any finished shards.
    let out = run_args(&args, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).contains("shards reused from an earlier run"),
        finished_before > 0,
        "{}",
        text(&out.stdout)
    );
    let out = run(SHARD, &["verify", &dst_s], &[]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).starts_with("ok: "),
        "{}",
        text(&out.stdout)
    );

    // And the result is byte for byte what an uninterrupted run writes.
    let clean = dir.path().join("clean");
    assert!(run_args(&shard_args(&src, &clean, 1), &[]).status.success());
    assert_eq!(tree(&dst), tree(&clean));

    // With two worker threads, several shards are written side by side; the abort leaves
    // some half written, and the rerun (with another thread count) still gives the same bytes.
    let dst2 = dir.path().join("dst2");
    abort_after_14(&shard_args(&src, &dst2, 2), &dst2);
    assert!(run_args(&shard_args(&src, &dst2, 3), &[]).status.success());
    assert_eq!(tree(&dst2), tree(&clean));
}

#[test]
fn skipped_files_fail_the_run_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let src = make(dir.path(), &["--oddities"]);
    let dst = dir.path().join("dst").to_string_lossy().into_owned();
    let out = run(SHARD, &[&src, &dst, "-q"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("shard-imagenet: 1 files skipped (listed in ")
            && err
                .trim_end()
                .ends_with("rerun with --allow-skips to accept them and write the manifest"),
        "{err}"
    );
    let out = run(SHARD, &[&src, &dst, "-q", "--allow-skips"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("converted 2, resized 0, skipped 1; greyscale 1, progressive 1"),
        "{stdout}"
    );
}

#[test]
fn errors_are_one_line_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope").to_string_lossy().into_owned();
    let dst = dir.path().join("dst").to_string_lossy().into_owned();
    let out = run(SHARD, &[&missing, &dst], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert_eq!(
        err.trim_end(),
        format!("shard-imagenet: error: {missing}: found neither train/ nor val/ (nor ILSVRC/Data/CLS-LOC/): expected an ImageNet folder")
    );

    // A flat val/ without a label file says what to pass.
    let src = make(dir.path(), &[]);
    std::fs::remove_file(Path::new(&src).join("LOC_val_solution.csv")).unwrap();
    let out = run(SHARD, &[&src, &dst], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("flat validation folder (6 files) but no label file: pass --val-labels FILE"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1);
}

#[test]
fn verify_reports_problems_with_exit_code_1() {
    let dir = tempfile::tempdir().unwrap();
    let src = make(dir.path(), &[]);
    let dst = dir.path().join("dst");
    let dst_s = dst.to_string_lossy().into_owned();
    assert!(run(SHARD, &[&src, &dst_s, "-q"], &[]).status.success());
    let idx = dst.join("val/val-000000.idx");
    let mut bytes = std::fs::read(&idx).unwrap();
    bytes[8] = 3;
    std::fs::write(&idx, bytes).unwrap();
    let out = run(SHARD, &["verify", &dst_s], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!("{}: SHA-256 is", idx.display())),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "{}: index format version 3, this reader supports version 1",
            idx.display()
        )),
        "{stdout}"
    );
}
