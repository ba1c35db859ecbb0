//! The command-line contract: exit codes, one-line errors, and recovery from an interrupted run.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

const SHARD: &str = env!("CARGO_BIN_EXE_shard-imagenet");
const MAKE: &str = env!("CARGO_BIN_EXE_make-imagenet-like");
const IMPORT_FMNIST: &str = env!("CARGO_BIN_EXE_import-fashion-mnist");
const PLOT: &str = env!("CARGO_BIN_EXE_plot-metrics");

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
        format!("shard-imagenet: error: {missing}: found neither train/ nor val/ (nor ILSVRC/Data/CLS-LOC/, nor ImageNet-V2's class index folders 0/ .. 999/): expected an ImageNet folder")
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

/// An IDX file: big-endian magic and sizes, then the bytes.
fn idx_bytes(magic: u32, sizes: &[u32], payload: &[u8]) -> Vec<u8> {
    let mut v = magic.to_be_bytes().to_vec();
    for s in sizes {
        v.extend_from_slice(&s.to_be_bytes());
    }
    v.extend_from_slice(payload);
    v
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// Fashion-MNIST-shaped IDX files: `train` gzip-compressed (as Debian ships them), `t10k` plain.
/// Image i is flat grey at level 10 + 20 * (i % 12) with its label i % 3 (train) or (i + 1) % 10.
fn write_fake_fashion_mnist(dir: &Path, num_train: u32, num_test: u32) {
    std::fs::create_dir_all(dir).unwrap();
    for (stem, n, gz) in [("train", num_train, true), ("t10k", num_test, false)] {
        let pixels: Vec<u8> = (0..n)
            .flat_map(|i| std::iter::repeat_n(10 + 20 * (i % 12) as u8, 28 * 28))
            .collect();
        let labels: Vec<u8> = (0..n)
            .map(|i| if stem == "train" { i % 3 } else { (i + 1) % 10 } as u8)
            .collect();
        let images = idx_bytes(0x803, &[n, 28, 28], &pixels);
        let labels = idx_bytes(0x801, &[n], &labels);
        let (images, labels, ext) = if gz {
            (gzip(&images), gzip(&labels), ".gz")
        } else {
            (images, labels, "")
        };
        std::fs::write(dir.join(format!("{stem}-images-idx3-ubyte{ext}")), images).unwrap();
        std::fs::write(dir.join(format!("{stem}-labels-idx1-ubyte{ext}")), labels).unwrap();
    }
}

#[test]
fn import_fashion_mnist_writes_a_folder_that_shard_imagenet_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let idx = dir.path().join("idx");
    write_fake_fashion_mnist(&idx, 12, 5);
    let out = dir.path().join("folder");
    let (idx_s, out_s) = (idx.to_string_lossy(), out.to_string_lossy());
    let res = run(
        IMPORT_FMNIST,
        &[&idx_s, &out_s, "-q", "--threads", "2"],
        &[],
    );
    assert!(res.status.success(), "{}", text(&res.stderr));
    let stdout = text(&res.stdout);
    assert!(stdout.contains("train: 12 of 12 images"), "{stdout}");
    assert!(stdout.contains("val: 5 of 5 images"), "{stdout}");

    let files = tree(&out);
    let classes = tools::fashion_mnist::CLASS_DIRS;
    assert_eq!(classes[0], "c0_tshirt_top");
    assert_eq!(classes[9], "c9_ankle_boot");
    for (split, n, label_of) in [
        ("train", 12u32, (|i| i % 3) as fn(u32) -> u32),
        ("val", 5, |i| (i + 1) % 10),
    ] {
        for i in 0..n {
            let rel = format!("{split}/{}/{i:05}.JPEG", classes[label_of(i) as usize]);
            let jpeg = files.get(&rel).unwrap_or_else(|| panic!("{rel} missing"));
            let img = image::load_from_memory(jpeg).unwrap();
            assert_eq!(img.color(), image::ColorType::L8, "{rel}");
            let img = img.into_luma8();
            assert_eq!(img.dimensions(), (28, 28));
            let want = 10 + 20 * (i % 12) as i32;
            assert!(
                img.pixels().all(|p| (p.0[0] as i32 - want).abs() <= 2),
                "{rel}: expected level {want}"
            );
        }
    }
    assert_eq!(files.len(), 12 + 5 + 1, "{:?}", files.keys());
    let synsets = text(&files["LOC_synset_mapping.txt"]);
    assert!(synsets.starts_with("c0_tshirt_top T-shirt/top\nc1_trouser Trouser\n"));
    // Every class folder exists in both splits, even an empty one.
    for split in ["train", "val"] {
        for c in classes {
            assert!(out.join(split).join(c).is_dir(), "{split}/{c}");
        }
    }

    // The same input gives the same bytes (one thread here); the output is refused twice.
    let again = dir.path().join("again");
    let res = run(
        IMPORT_FMNIST,
        &[&idx_s, &again.to_string_lossy(), "-q", "--threads", "1"],
        &[],
    );
    assert!(res.status.success());
    assert_eq!(tree(&again), files);
    let res = run(IMPORT_FMNIST, &[&idx_s, &out_s, "-q"], &[]);
    assert_eq!(res.status.code(), Some(2));
    assert!(text(&res.stderr).contains("already exists"));

    // shard-imagenet takes it as it is, with labels from the class folders and names.
    let dst = dir.path().join("shards");
    let res = run(SHARD, &[&out_s, &dst.to_string_lossy(), "-q"], &[]);
    assert!(res.status.success(), "{}", text(&res.stderr));
    let ds = shards::Dataset::open(&dst).unwrap();
    let val = ds.split("val").unwrap();
    assert_eq!(val.len(), 5);
    let mut got: Vec<(String, u32)> = (0..val.len())
        .map(|i| {
            let s = val.get(i).unwrap();
            (s.key.to_string(), s.label)
        })
        .collect();
    got.sort();
    let want: Vec<(String, u32)> = (0..5).map(|i| (format!("{i:05}"), (i + 1) % 10)).collect();
    assert_eq!(got, want);

    // --limit-per-class and --upscale.
    let small = dir.path().join("small");
    let res = run(
        IMPORT_FMNIST,
        &[
            &idx_s,
            &small.to_string_lossy(),
            "-q",
            "--limit-per-class",
            "2",
            "--upscale",
            "64",
        ],
        &[],
    );
    assert!(res.status.success(), "{}", text(&res.stderr));
    let files = tree(&small);
    let train: Vec<&String> = files.keys().filter(|k| k.starts_with("train/")).collect();
    assert_eq!(
        train,
        [
            "train/c0_tshirt_top/00000.JPEG",
            "train/c0_tshirt_top/00003.JPEG",
            "train/c1_trouser/00001.JPEG",
            "train/c1_trouser/00004.JPEG",
            "train/c2_pullover/00002.JPEG",
            "train/c2_pullover/00005.JPEG",
        ]
    );
    let img = image::load_from_memory(&files["train/c1_trouser/00004.JPEG"]).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));
    assert_eq!(files.keys().filter(|k| k.starts_with("val/")).count(), 5);
}

#[test]
fn import_fashion_mnist_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let idx = dir.path().join("idx");
    write_fake_fashion_mnist(&idx, 4, 2);
    // Swap the test set's images and labels: each has the other's magic number.
    let images = idx.join("t10k-images-idx3-ubyte");
    std::fs::write(&images, idx_bytes(0x801, &[2], &[0, 1])).unwrap();
    let out = dir.path().join("out").to_string_lossy().into_owned();
    let res = run(IMPORT_FMNIST, &[&idx.to_string_lossy(), &out, "-q"], &[]);
    assert_eq!(res.status.code(), Some(2));
    let err = text(&res.stderr);
    assert_eq!(
        err.trim_end(),
        format!(
            "import-fashion-mnist: error: {}: bad magic number 0x00000801, expected 0x00000803 (IDX images) (this is a labels file)",
            images.display()
        )
    );
    // Nothing is written before every file has been checked.
    assert!(!Path::new(&out).exists());

    // Counts that disagree.
    std::fs::write(&images, idx_bytes(0x803, &[3, 28, 28], &[0; 3 * 28 * 28])).unwrap();
    let res = run(IMPORT_FMNIST, &[&idx.to_string_lossy(), &out, "-q"], &[]);
    let err = text(&res.stderr);
    assert!(
        err.contains("holds 3 images but") && err.contains("holds 2 labels"),
        "{err}"
    );

    // A missing file names both names it looked for.
    let res = run(
        IMPORT_FMNIST,
        &[&dir.path().to_string_lossy(), &out, "-q"],
        &[],
    );
    let err = text(&res.stderr);
    assert!(
        err.contains("found neither train-images-idx3-ubyte.gz nor train-images-idx3-ubyte"),
        "{err}"
    );
}

#[test]
fn plot_metrics_writes_a_png() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("metrics.jsonl");
    std::fs::write(
        &jsonl,
        "{\"epoch\":0,\"step\":0,\"loss\":2.3,\"lr\":0.001}\n\
         {\"epoch\":0,\"step\":1,\"loss\":2.1,\"lr\":0.002}\n\
         {\"epoch\":0,\"step\":2,\"top1\":31.0,\"top5\":70.0,\"val_loss\":2.0}\n\
         garbage\n",
    )
    .unwrap();
    let res = run(PLOT, &[&jsonl.to_string_lossy()], &[]);
    assert!(res.status.success(), "{}", text(&res.stderr));
    let png = dir.path().join("plot.png");
    assert_eq!(
        text(&res.stdout).trim_end(),
        format!(
            "{}: 2 training lines, 1 evaluations, 1 lines skipped (not JSON objects)",
            png.display()
        )
    );
    let img = image::open(&png).unwrap();
    assert_eq!(
        (img.width(), img.height()),
        (tools::plot::WIDTH_PX, tools::plot::HEIGHT_PX)
    );
    let res = run(PLOT, &["/nonexistent/metrics.jsonl", "--out", "x.png"], &[]);
    assert_eq!(res.status.code(), Some(2));
    assert!(
        text(&res.stderr).starts_with("plot-metrics: error: reading /nonexistent/metrics.jsonl")
    );
}

const TRAIN: &str = env!("CARGO_BIN_EXE_train");

/// A `train` command line that needs no data before the rendezvous (its test mode stops there).
fn dist_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "--recipe",
        "a3",
        "--data",
        "/nonexistent-shards",
        "--out",
        &out.to_string_lossy(),
        "--device",
        "cpu",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts rank `rank` of `world` by hand (as torchrun or Slurm would), in the test mode.
fn spawn_rank(rank: usize, world: usize, port: u16, args: &[String]) -> std::process::Child {
    Command::new(TRAIN)
        .args(args)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("RSB_DIST_TEST", "rendezvous")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn the_launcher_meets_every_worker_at_the_rendezvous() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = std::time::Instant::now();
    let args = dist_args(&dir.path().join("run"), &["--nproc-per-node", "3"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(TRAIN, &args, &[("RSB_DIST_TEST", "rendezvous")]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    for r in 0..3 {
        assert!(
            err.contains(&format!("[rank {r}] rank {r} of 3: rendezvous complete")),
            "{err}"
        );
    }
    assert!(t0.elapsed() < std::time::Duration::from_secs(30));
}

#[test]
fn the_launcher_stops_every_worker_when_one_fails() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = std::time::Instant::now();
    let args = dist_args(&dir.path().join("run"), &["--nproc-per-node", "3"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Rank 1 fails after the rendezvous; ranks 0 and 2 would wait 60 s.
    let out = run(TRAIN, &args, &[("RSB_DIST_TEST", "fail:1")]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("rank 1 failed (exit code 2)")
            && err.contains("planted failure of rank 1")
            && err.contains("the other ranks were stopped"),
        "{err}"
    );
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(30),
        "took {:?}",
        t0.elapsed()
    );
}

#[test]
fn model_data_needs_a_known_model() {
    let dir = tempfile::tempdir().unwrap();
    let args = dist_args(
        &dir.path().join("run"),
        &["--model", "resnet51", "--model-data"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(TRAIN, &args, &[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--model-data: no timm data settings for model \"resnet51\"")
            && err.contains("efficientnet_b4"),
        "{err}"
    );
}

#[test]
fn the_rendezvous_refuses_ranks_with_another_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let out_dir = dir.path().join("run");
    let a = spawn_rank(0, 2, port, &dist_args(&out_dir, &[]));
    let b = spawn_rank(
        1,
        2,
        port,
        &dist_args(&out_dir, &["--set", "optim.lr=0.001"]),
    );
    for (rank, child) in [(0, a), (1, b)] {
        let out = child.wait_with_output().unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "rank {rank}: {err}");
        assert!(
            err.contains("rank 1: recipe (hash of the resolved recipe) differs from rank 0's"),
            "rank {rank}: {err}"
        );
    }
}

#[test]
fn a_rank_that_never_arrives_is_named_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = std::time::Instant::now();
    // A world of 2 with only rank 0 started.
    let args = dist_args(&dir.path().join("run"), &["--dist-timeout", "2"]);
    let out = spawn_rank(0, 2, free_port(), &args)
        .wait_with_output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("rank(s) [1] did not arrive within 2 s"),
        "{err}"
    );
    assert!(t0.elapsed() < std::time::Duration::from_secs(20));
}

#[test]
fn a_cpu_run_across_processes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let args = dist_args(&dir.path().join("run"), &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let env = [
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29999"),
    ];
    let out = run(TRAIN, &args, &env);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("a CPU run across processes or machines is not supported"),
        "{err}"
    );
}

const EVALUATE: &str = env!("CARGO_BIN_EXE_evaluate");

/// The generated 3-class set with `val_per_class` validation images a class, sharded into
/// `dir/shards`, and a freshly initialised resnet18 for it.
fn evaluate_fixture(dir: &Path, val_per_class: &str) -> (std::path::PathBuf, candle_nn::VarMap) {
    let src = make(dir, &["--val-per-class", val_per_class]);
    let shards = dir.join("shards");
    let out = run_args(&shard_args(&src, &shards, 1), &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let cfg = trainer::model::ResNetConfig::by_name("resnet18").unwrap();
    let recipe = trainer::recipe::Recipe::a3();
    let device = candle_core::Device::Cpu;
    let (varmap, _) = trainer::train::build_model(&recipe, Some(&cfg), 3, &device).unwrap();
    (shards, varmap)
}

/// `evaluate` over two sizes and two crop ratios gives, line for line, what four single runs
/// give (the same top-1, top-5 and loss bits); a checkpoint without a recipe beside it needs
/// `--model`.
#[test]
fn evaluate_sweeps_equal_single_runs() {
    let dir = tempfile::tempdir().unwrap();
    // A freshly initialised resnet18 for 3 classes, saved under timm's names.
    let (shards, varmap) = evaluate_fixture(dir.path(), "6");
    let ckpt = dir.path().join("weights.safetensors");
    varmap.save(&ckpt).unwrap();

    let ckpt_s = ckpt.to_string_lossy().into_owned();
    let shards_s = shards.to_string_lossy().into_owned();
    let eval = |sizes: &str, crops: &str| -> Vec<serde_json::Value> {
        let args = [
            "--checkpoint",
            &ckpt_s,
            "--data",
            &shards_s,
            "--model",
            "resnet18",
            "--sizes",
            sizes,
            "--crop-pct",
            crops,
            "--batch-size",
            "7",
            "--workers",
            "2",
        ];
        let res = run(EVALUATE, &args, &[]);
        assert!(res.status.success(), "{}", text(&res.stderr));
        text(&res.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let sweep = eval("32,40", "0.875,1.0");
    assert_eq!(sweep.len(), 4);
    // The PNG of top-1 against size, by default beside the checkpoint.
    let png = image::open(dir.path().join("weights.eval-val.png")).unwrap();
    assert!(png.width() > 0 && png.height() > 0);
    let mut i = 0;
    for size in ["32", "40"] {
        for crop in ["0.875", "1.0"] {
            let single = eval(size, crop);
            assert_eq!(single.len(), 1);
            let (a, b) = (&sweep[i], &single[0]);
            assert_eq!(a["size"].to_string(), size);
            assert_eq!(a["images"], 18);
            for k in ["size", "crop_pct", "top1", "top5", "loss", "images"] {
                assert_eq!(a[k], b[k], "{k} at {size} px, crop {crop}");
            }
            i += 1;
        }
    }
    // Without --model and without a recipe.toml beside the checkpoint: a clear error.
    let res = run(
        EVALUATE,
        &["--checkpoint", &ckpt_s, "--data", &shards_s],
        &[],
    );
    assert_eq!(res.status.code(), Some(2));
    assert!(
        text(&res.stderr).contains("name the network with --model"),
        "{}",
        text(&res.stderr)
    );
}

/// `evaluate --real-labels`: a network whose logits are its classifier bias (zero weights, bias
/// one-hot at class 1) predicts class 1 for every image, so ReaL's answer is known from a
/// hand-made `real.json`: lists with 1 in them are right (several labels included), lists
/// without it wrong, empty lists not counted. The lists are by ILSVRC2012 file number; the
/// shards are in shuffled order, so a mapping by position would score differently. A file
/// shorter than the split is an error naming it.
#[test]
fn evaluate_scores_real_labels_by_file_name() {
    use candle_core::{Device, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let (shards, varmap) = evaluate_fixture(dir.path(), "4");
    {
        let data = varmap.data().lock().unwrap();
        let w = &data["fc.weight"];
        w.set(&w.zeros_like().unwrap()).unwrap();
        data["fc.bias"]
            .set(&Tensor::new(&[0f32, 1.0, 0.0], &Device::Cpu).unwrap())
            .unwrap();
    }
    let ckpt = dir.path().join("class1.safetensors");
    varmap.save(&ckpt).unwrap();
    // Images 1..=12: right (1, 4, 7, 9, 12), wrong (2, 5, 8, 10), not counted (3, 6, 11).
    let lists = "[[1], [0], [], [0, 1], [2, 0], [], [1, 2], [2], [1], [0], [], [2, 1, 0]]";
    let real = dir.path().join("real.json");
    std::fs::write(&real, lists).unwrap();
    let (ckpt_s, shards_s, real_s) = (
        ckpt.to_string_lossy().into_owned(),
        shards.to_string_lossy().into_owned(),
        real.to_string_lossy().into_owned(),
    );
    let args = [
        "--checkpoint",
        &ckpt_s,
        "--data",
        &shards_s,
        "--model",
        "resnet18",
        "--sizes",
        "32",
        "--batch-size",
        "5",
        "--real-labels",
        &real_s,
    ];
    let res = run(EVALUATE, &args, &[]);
    assert!(res.status.success(), "{}", text(&res.stderr));
    let line: serde_json::Value = serde_json::from_str(text(&res.stdout).trim()).unwrap();
    assert_eq!(line["images"], 12);
    assert_eq!(line["real_images"], 9);
    assert!((line["top1"].as_f64().unwrap() - 100.0 * 4.0 / 12.0).abs() < 1e-9);
    assert!((line["real_top1"].as_f64().unwrap() - 100.0 * 5.0 / 9.0).abs() < 1e-9);
    assert_eq!(
        line["real_top5"], 100.0,
        "3 classes: every label is in the top 5"
    );

    // A file that lists fewer images than the shards hold.
    std::fs::write(&real, "[[1], [0], [], [0, 1]]").unwrap();
    let res = run(EVALUATE, &args, &[]);
    let err = text(&res.stderr);
    assert_eq!(res.status.code(), Some(2), "{err}");
    assert!(
        err.contains("real.json") && err.contains("does not match the shards"),
        "{err}"
    );
    // Not JSON lists of class indices.
    std::fs::write(&real, "{\"a\": 1}").unwrap();
    let err = text(&run(EVALUATE, &args, &[]).stderr);
    assert!(err.contains("expected ImageNet-ReaL labels"), "{err}");
}

/// ImageNet-V2 as its archives extract: folders `0` .. `N-1` named by class index, holding
/// JPEGs named by hash. `shard-imagenet` makes one `val` split whose labels are the folder
/// indices (not the sorted folder names' positions: "10" sorts before "2"), with a synset file
/// naming the classes when given; a folder that is not an index is not taken for V2.
#[test]
fn imagenet_v2_folders_shard_with_their_index_as_label() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("imagenetv2-matched-frequency-format-val");
    let mut want = BTreeMap::new();
    for class in [0u32, 1, 2, 10] {
        let folder = src.join(class.to_string());
        std::fs::create_dir_all(&folder).unwrap();
        for k in 0..2u32 {
            let name = format!("{:040x}", (class as u128 + 1) * 7919 + k as u128);
            let img = image::RgbImage::from_fn(24, 20, |x, y| {
                image::Rgb([(x * 9) as u8, (y * 11) as u8, (class * 20 + k) as u8])
            });
            img.save(folder.join(format!("{name}.jpeg"))).unwrap();
            want.insert(name, class);
        }
    }
    let synsets = dir.path().join("synsets.txt");
    let lines: String = (0..11)
        .map(|i| format!("n{:08} class {i}\n", 109 - i))
        .collect();
    std::fs::write(&synsets, lines).unwrap();
    for with_synsets in [false, true] {
        let dst = dir.path().join(format!("v2-{with_synsets}"));
        let mut args = shard_args(&src.to_string_lossy(), &dst, 1);
        if with_synsets {
            args.extend(["--synsets".into(), synsets.to_string_lossy().into_owned()]);
        }
        let out = run_args(&args, &[]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let data = shards::Dataset::open(&dst).unwrap();
        assert_eq!(data.num_classes(), 11, "classes 0..=10");
        let classes = &data.manifest().classes;
        if with_synsets {
            // Sorted by wnid: index 0 is the smallest wnid.
            assert_eq!(classes[0].wnid, "n00000099");
            assert_eq!(classes[0].name.as_deref(), Some("class 10"));
        } else {
            assert_eq!(classes[10].wnid, "10");
        }
        let val = data.split("val").unwrap();
        assert_eq!(val.len(), 8);
        let got: BTreeMap<String, u32> = (0..val.len())
            .map(|i| {
                let s = val.get(i).unwrap();
                (s.key.to_string(), s.label)
            })
            .collect();
        assert_eq!(got, want);
    }
    // A stray folder name: not V2, and the error says what was expected.
    std::fs::create_dir_all(src.join("extra")).unwrap();
    let out = run_args(
        &shard_args(&src.to_string_lossy(), &dir.path().join("x"), 1),
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("ImageNet-V2"),
        "{}",
        text(&out.stderr)
    );
}
