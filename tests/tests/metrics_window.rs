//! A metrics line's `loss` is the mean loss of the updates since the previous line (`loss_last`
//! the last update's), and a run interrupted mid-window writes, once resumed, the lines of an
//! uninterrupted run bit for bit, on one rank and on ranks as threads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tools::sharding::{run, ShardOptions};
use tools::synth::{generate, SynthOptions, ValLayout};
use trainer::model::ResNetConfig;
use trainer::recipe::Recipe;
use trainer::train::{train_threads, Progress, TrainOptions};

/// 3 classes x 12 training images (2 validation each), sharded into `dir/shards`.
fn tiny_shards(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    let synth = SynthOptions {
        classes: 3,
        per_class: 12,
        val_per_class: 2,
        seed: 11,
        oddities: false,
        val_layout: ValLayout::Folders,
        quality: 90,
        threads: 2,
    };
    generate(&src, &synth).unwrap();
    let shards = dir.join("shards");
    let opts = ShardOptions {
        quiet: true,
        threads: 2,
        max_side: Some(64),
        ..ShardOptions::default()
    };
    run(&src, &shards, &opts).unwrap();
    shards
}

/// A3 at 32 px, micro-batches of 4, 2 per update: 36 samples give 4 updates per epoch, 2 epochs
/// give 8. A metrics line every `log_every` updates (and at each epoch end), a checkpoint every
/// 5 (step 5 is the second update of epoch 1).
fn recipe(log_every: u64) -> Recipe {
    Recipe::a3()
        .with_overrides(&[
            "schedule.epochs=2".into(),
            "schedule.warmup_epochs=1".into(),
            "data.train_size_px=32".into(),
            "data.test_size_px=32".into(),
            "run.micro_batch=4".into(),
            "run.global_batch=8".into(),
            "run.workers=2".into(),
            "run.checkpoint_every_steps=5".into(),
            format!("run.log_every_steps={log_every}"),
        ])
        .unwrap()
}

fn options(recipe: &Recipe, data: &Path, run_dir: &Path) -> TrainOptions {
    let mut o = TrainOptions::new(recipe.clone(), data, run_dir);
    o.model = Some(trainer::model::NetConfig::ResNet(ResNetConfig {
        layers: [1, 1, 1, 1],
        ..ResNetConfig::by_name("resnet18").unwrap()
    }));
    o.progress = Progress::Quiet;
    o
}

/// The update lines by step, the last one of each step (a resumed run writes the replayed
/// steps again): (loss, loss_last) as bits.
fn update_lines(run_dir: &Path) -> BTreeMap<u64, (u64, u64)> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l.get("top1").is_none())
        .map(|l| {
            let bits = |k: &str| {
                l[k].as_f64()
                    .unwrap_or_else(|| panic!("{k}: {l}"))
                    .to_bits()
            };
            (
                l["step"].as_u64().unwrap(),
                (bits("loss"), bits("loss_last")),
            )
        })
        .collect()
}

/// Trains `recipe` on `world` ranks into `run_dir`, stopping after `max_steps` updates if set.
fn train(recipe: &Recipe, data: &Path, run_dir: &Path, world: usize, stop: Option<u64>) {
    let mut o = options(recipe, data, run_dir);
    o.max_steps = stop;
    o.resume = run_dir.join("checkpoints/latest").exists();
    let s = train_threads(&o, world).unwrap();
    assert_eq!(s.interrupted, stop.is_some());
}

#[test]
fn the_loss_is_the_window_mean_and_resume_writes_the_same_lines() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_shards(dir.path());

    // Every update logged: each line's loss is that update's loss.
    let every = dir.path().join("every");
    train(&recipe(1), &data, &every, 1, None);
    let per_update: Vec<f64> = update_lines(&every)
        .into_iter()
        .map(|(step, (loss, last))| {
            assert_eq!(loss, last, "step {step}: a window of one update");
            f64::from_bits(loss)
        })
        .collect();
    assert_eq!(per_update.len(), 8);
    // BCE under CutMix/Mixup: the losses differ from update to update.
    assert!(
        per_update.windows(2).any(|w| w[0] != w[1]),
        "{per_update:?}"
    );

    // Every 3 updates and at epoch ends: windows {1,2,3} {4} {5,6} {7,8}.
    let straight = dir.path().join("straight");
    train(&recipe(3), &data, &straight, 1, None);
    let lines = update_lines(&straight);
    let mean = |from: usize, to: usize| {
        let mut sum = 0.0f64;
        for l in &per_update[from - 1..to] {
            sum += l;
        }
        sum / (to - from + 1) as f64
    };
    let expected: BTreeMap<u64, (u64, u64)> = [(3, 1), (4, 4), (6, 5), (8, 7)]
        .into_iter()
        .map(|(step, from)| {
            let last = per_update[step - 1];
            (step as u64, (mean(from, step).to_bits(), last.to_bits()))
        })
        .collect();
    assert_eq!(lines, expected, "per-update losses {per_update:?}");

    // Stopped after update 7 (log interval 3 does not divide it): the latest checkpoint is
    // step 5, in the middle of window {5,6}; the resumed run writes the same lines.
    let resumed = dir.path().join("resumed");
    train(&recipe(3), &data, &resumed, 1, Some(7));
    let side: serde_json::Value =
        serde_json::from_slice(&std::fs::read(resumed.join("checkpoints/step-5.json")).unwrap())
            .unwrap();
    assert_eq!(
        (
            &side["metrics_window"]["updates"],
            &side["metrics_window"]["loss_sum_bits"]
        ),
        (&1.into(), &per_update[4].to_bits().into()),
        "{side}"
    );
    train(&recipe(3), &data, &resumed, 1, None);
    assert_eq!(update_lines(&resumed), expected);

    // Two ranks as threads: the same per-update losses, so the same lines; interrupted on two
    // ranks and resumed on one, too.
    let two = dir.path().join("two");
    train(&recipe(3), &data, &two, 2, None);
    assert_eq!(update_lines(&two), expected);
    let two_resumed = dir.path().join("two-resumed");
    train(&recipe(3), &data, &two_resumed, 2, Some(7));
    train(&recipe(3), &data, &two_resumed, 1, None);
    assert_eq!(update_lines(&two_resumed), expected);
}
