//! The training loop on generated shards: exact resume, learning, gradient accumulation, and
//! data parallelism (ranks as threads) against one rank.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use tools::sharding::{run, ShardOptions};
use tools::synth::{generate, SynthOptions, ValLayout};
use trainer::dist::ThreadGroup;
use trainer::loss::Targets;
use trainer::model::ResNetConfig;
use trainer::recipe::{Interpolation, Recipe};
use trainer::train::{
    evaluate_rank, train, train_threads, GradAccumulator, Progress, TrainOptions,
};

/// A generated `make-imagenet-like` set, sharded into `dir/shards`.
fn shard_set(dir: &Path, classes: usize, per_class: usize, val_per_class: usize) -> PathBuf {
    let src = dir.join("src");
    generate(
        &src,
        &SynthOptions {
            classes,
            per_class,
            val_per_class,
            seed: 5,
            oddities: false,
            val_layout: ValLayout::Folders,
            quality: 90,
            threads: 2,
        },
    )
    .unwrap();
    let dst = dir.join("shards");
    run(
        &src,
        &dst,
        &ShardOptions {
            quiet: true,
            threads: 2,
            // Small files decode fast; the crops are 32 px anyway.
            max_side: Some(96),
            ..ShardOptions::default()
        },
    )
    .unwrap();
    dst
}

/// ResNet-10: resnet18's stem and widths with one BasicBlock per stage.
fn tiny_net() -> ResNetConfig {
    ResNetConfig {
        layers: [1, 1, 1, 1],
        ..ResNetConfig::by_name("resnet18").unwrap()
    }
}

/// A3 shortened to `epochs` epochs at 32 px with micro-batches of `micro` and `accum` of them
/// per update, everything else (BCE with threshold, LAMB, Mixup/CutMix, RandAugment) as A3.
fn short_a3(epochs: u32, micro: u32, accum: u32) -> Recipe {
    Recipe::a3()
        .with_overrides(&[
            format!("schedule.epochs={epochs}"),
            "schedule.warmup_epochs=1".into(),
            "data.train_size_px=32".into(),
            "data.test_size_px=32".into(),
            format!("run.micro_batch={micro}"),
            format!("run.global_batch={}", micro * accum),
            "run.log_every_steps=1".into(),
            "run.workers=2".into(),
        ])
        .unwrap()
}

fn options(recipe: Recipe, data: &Path, run_dir: &Path) -> TrainOptions {
    let mut o = TrainOptions::new(recipe, data, run_dir);
    o.model = Some(tiny_net().into());
    o.progress = Progress::Quiet;
    o
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every tensor of two safetensors files, compared byte for byte.
fn assert_same_tensors(a: &Path, b: &Path) {
    let (ta, tb) = (load(a), load(b));
    let mut keys: Vec<&String> = ta.keys().collect();
    keys.sort();
    let mut kb: Vec<&String> = tb.keys().collect();
    kb.sort();
    assert_eq!(keys, kb, "{} vs {}: tensor names", a.display(), b.display());
    assert!(!keys.is_empty());
    for k in keys {
        let (x, y) = (&ta[k], &tb[k]);
        assert_eq!(x.dtype(), y.dtype(), "{k}");
        let bytes = |t: &Tensor| -> Vec<u64> {
            let t = t.flatten_all().unwrap();
            match t.dtype() {
                DType::F32 => t
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits() as u64)
                    .collect(),
                _ => t
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect(),
            }
        };
        assert!(
            bytes(x) == bytes(y),
            "{k}: values differ between {} and {}",
            a.display(),
            b.display()
        );
    }
}

fn metric_lines(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The last line logged for each (kind, step): a resumed run logs the replayed steps again.
fn by_step(lines: &[serde_json::Value]) -> HashMap<(bool, u64), serde_json::Value> {
    lines
        .iter()
        .map(|l| {
            (
                (l.get("top1").is_some(), l["step"].as_u64().unwrap()),
                l.clone(),
            )
        })
        .collect()
}

#[test]
fn resume_is_bit_identical_to_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = shard_set(dir.path(), 3, 12, 2);
    // 36 samples / micro 4 = 9 micro-batches = 4 updates of 2 per epoch; 2 epochs = 8 updates.
    // Drop-path on, so its per-step seeds are exercised too; a checkpoint every 2 updates.
    let recipe = short_a3(2, 4, 2)
        .with_overrides(&["model.drop_path_rate=0.1", "run.checkpoint_every_steps=2"])
        .unwrap();

    let straight = dir.path().join("straight");
    let s = train(&options(recipe.clone(), &data, &straight)).unwrap();
    assert_eq!((s.steps, s.updates_per_epoch, s.interrupted), (8, 4, false));

    // Stopped after update 7: the latest checkpoint is the periodic one at 6, mid-epoch 1.
    let resumed = dir.path().join("resumed");
    let mut o = options(recipe.clone(), &data, &resumed);
    o.max_steps = Some(7);
    let s = train(&o).unwrap();
    assert_eq!((s.steps, s.interrupted), (7, true));
    let latest = std::fs::read_to_string(resumed.join("checkpoints/latest")).unwrap();
    assert_eq!(latest.trim(), "step-6");
    let side: serde_json::Value =
        serde_json::from_slice(&std::fs::read(resumed.join("checkpoints/step-6.json")).unwrap())
            .unwrap();
    assert_eq!(side["loader"]["epoch"], 1);
    assert_eq!(
        side["loader"]["next_batch"], 4,
        "2 updates x 2 micro-batches into epoch 1"
    );

    let mut o = options(recipe.clone(), &data, &resumed);
    o.resume = true;
    let s = train(&o).unwrap();
    assert_eq!((s.steps, s.interrupted), (8, false));

    let ck = |d: &Path, f: &str| d.join("checkpoints").join(f);
    assert_same_tensors(
        &ck(&straight, "step-8.safetensors"),
        &ck(&resumed, "step-8.safetensors"),
    );
    assert_same_tensors(
        &ck(&straight, "step-8.optim.safetensors"),
        &ck(&resumed, "step-8.optim.safetensors"),
    );
    // Training actually moved the weights away from the step-2 checkpoint.
    let (w2, w8) = (
        load(&ck(&straight, "step-2.safetensors")),
        load(&ck(&straight, "step-8.safetensors")),
    );
    let diff = (&w2["fc.weight"] - &w8["fc.weight"])
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() > 0.0);

    // Metrics: the same loss, lr and evaluation at every step.
    let (a, b) = (metric_lines(&straight), metric_lines(&resumed));
    let (ma, mb) = (by_step(&a), by_step(&b));
    assert_eq!(ma.len(), 8 + 2, "8 step lines and 2 eval lines: {a:?}");
    for (key, la) in &ma {
        let lb = &mb[key];
        for field in ["epoch", "loss", "lr", "top1", "top5", "val_loss"] {
            assert_eq!(la.get(field), lb.get(field), "{key:?} {field}");
        }
    }
    // One update per 2 micro-batches, with the per-epoch schedule: warmup lr in epoch 0.
    let sched = recipe.cosine_schedule(recipe.resolved_lr(8).0, 4);
    for step in 1..=8u64 {
        let line = &ma[&(false, step)];
        assert_eq!(line["lr"].as_f64().unwrap(), sched.lr_at(step - 1, 4));
        assert_eq!(line["epoch"].as_u64().unwrap(), (step - 1) / 4);
    }
    assert_eq!(
        ma[&(false, 1)]["lr"].as_f64().unwrap(),
        recipe.schedule.warmup_lr
    );

    // A changed recipe refuses to resume from these checkpoints, naming the sidecar.
    let mut o = options(
        recipe.with_overrides(&["optim.lr=0.001"]).unwrap(),
        &data,
        &resumed,
    );
    o.resume = true;
    let err = train(&o).unwrap_err().to_string();
    assert!(
        err.contains("step-8.json") && err.contains("recipe"),
        "{err}"
    );
}

#[test]
fn a_short_run_learns() {
    let dir = tempfile::tempdir().unwrap();
    let t = std::time::Instant::now();
    let data = shard_set(dir.path(), 10, 24, 6);
    let gen_s = t.elapsed().as_secs_f64();
    // The recipe's machinery (LAMB, BCE with threshold, warmup + cosine, RandomResizedCrop)
    // with the regularisers that slow learning on a tiny budget (Mixup/CutMix, RandAugment) off.
    let recipe = short_a3(4, 16, 1)
        .with_overrides(&[
            "augment.mix_prob=0.0",
            "augment.rand_augment=\"\"",
            "optim.lr=0.02",
            "optim.lr_scaling=\"none\"",
            "run.eval_every_epochs=4",
        ])
        .unwrap();
    assert_eq!(recipe.data.test_interpolation, Interpolation::Bicubic);
    let run_dir = dir.path().join("run");
    let s = train(&options(recipe, &data, &run_dir)).unwrap();
    let r = s.last_eval.unwrap();
    eprintln!(
        "generate {gen_s:.1} s, train+eval {:.1} s: top1 {:.1} top5 {:.1} val loss {:.3} ({} images)",
        s.wall_s, r.top1, r.top5, r.loss, r.samples
    );
    assert_eq!(r.samples, 60);
    // Chance is 10 %.
    assert!(r.top1 > 30.0, "top-1 {} is not above 3x chance", r.top1);
    let written = std::fs::read_to_string(run_dir.join("recipe.toml")).unwrap();
    assert!(written.contains("lr = 0.02"), "{written}");
}

#[test]
fn accumulated_gradients_equal_the_full_batch_gradient() -> candle_core::Result<()> {
    // A model without BatchNorm: micro-batch losses divided by the number of micro-batches,
    // summed, give the gradient of the mean loss over the whole batch.
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let fc = candle_nn::linear(
        6,
        5,
        VarBuilder::from_varmap(&varmap, DType::F32, &dev).pp("fc"),
    )?;
    let vars: Vec<(String, candle_core::Var)> = {
        let mut v: Vec<_> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let xs = Tensor::randn(0f32, 1.0, (8, 6), &dev)?;
    let labels = Tensor::new(&[0u32, 1, 2, 3, 4, 0, 1, 2], &dev)?;
    let loss_fn = Recipe::a1().train_loss();

    let mut full = GradAccumulator::new(&vars);
    full.add(
        loss_fn
            .forward(&fc.forward(&xs)?, Targets::Classes(&labels))?
            .backward()?,
    )?;
    let full = full.into_store()?;

    let mut acc = GradAccumulator::new(&vars);
    for m in 0..2 {
        let (x, y) = (xs.narrow(0, 4 * m, 4)?, labels.narrow(0, 4 * m, 4)?);
        let loss = (loss_fn.forward(&fc.forward(&x)?, Targets::Classes(&y))? / 2.0)?;
        acc.add(loss.backward()?)?;
    }
    let acc = acc.into_store()?;
    for (name, var) in &vars {
        let a = full.get(var.as_tensor()).unwrap();
        let b = acc.get(var.as_tensor()).unwrap();
        let scale = a.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(scale > 0.0, "{name}: zero gradient");
        let err = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err <= 1e-6 * scale.max(1.0), "{name}: max difference {err}");
    }
    Ok(())
}

/// The trainable tensors of a weights file (BatchNorm running statistics are per rank, so they
/// are left out when runs of different world sizes are compared).
fn assert_same_trainable(a: &Path, b: &Path) {
    let keep = |m: HashMap<String, Tensor>| -> HashMap<String, Tensor> {
        m.into_iter()
            .filter(|(k, _)| !k.contains("running_") && !k.contains("num_batches_tracked"))
            .collect()
    };
    let (ta, tb) = (keep(load(a)), keep(load(b)));
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    candle_core::safetensors::save(&ta, &pa).unwrap();
    candle_core::safetensors::save(&tb, &pb).unwrap();
    assert_same_tensors(&pa, &pb);
}

/// Loss, lr, gradient norm and skip flag of every update line, by step.
fn update_metrics(run_dir: &Path) -> Vec<(u64, [Option<serde_json::Value>; 4])> {
    let mut v: Vec<_> = by_step(&metric_lines(run_dir))
        .into_iter()
        .filter(|((eval, _), _)| !eval)
        .map(|((_, step), l)| {
            let f = |k: &str| l.get(k).cloned();
            (step, [f("loss"), f("lr"), f("grad_norm"), f("applied")])
        })
        .collect();
    v.sort_by_key(|x| x.0);
    v
}

/// 36 samples, micro-batches of 4, 4 per update (global batch 16): 2 updates per epoch, 2
/// epochs, drop path on, a checkpoint after every update.
fn four_micro_batch_recipe() -> Recipe {
    short_a3(2, 4, 4)
        .with_overrides(&["model.drop_path_rate=0.1", "run.checkpoint_every_steps=1"])
        .unwrap()
}

#[test]
fn ranks_as_threads_train_what_one_rank_trains() {
    let dir = tempfile::tempdir().unwrap();
    let data = shard_set(dir.path(), 3, 12, 2);
    let recipe = four_micro_batch_recipe();
    let one = dir.path().join("w1");
    let s = train(&options(recipe.clone(), &data, &one)).unwrap();
    assert_eq!((s.steps, s.updates_per_epoch), (4, 2));
    let ck = |d: &Path, f: &str| d.join("checkpoints").join(f);
    for world in [2, 4] {
        let run = dir.path().join(format!("w{world}"));
        let s = train_threads(&options(recipe.clone(), &data, &run), world).unwrap();
        assert_eq!((s.steps, s.updates_per_epoch), (4, 2), "world {world}");
        // The same micro-batches, drop-path masks, Mixup draws, loss scaling and summation
        // order: weights and optimizer state bit for bit (4 = 2 x 2 = 4 x 1 micro-batches).
        assert_same_trainable(
            &ck(&one, "step-4.safetensors"),
            &ck(&run, "step-4.safetensors"),
        );
        assert_same_tensors(
            &ck(&one, "step-4.optim.safetensors"),
            &ck(&run, "step-4.optim.safetensors"),
        );
        assert_eq!(update_metrics(&one), update_metrics(&run), "world {world}");
        let lines = metric_lines(&run);
        assert!(lines.iter().all(|l| l["world_size"] == world), "{lines:?}");
        let side: serde_json::Value =
            serde_json::from_slice(&std::fs::read(ck(&run, "step-4.json")).unwrap()).unwrap();
        assert_eq!(
            (side["world_size"].clone(), side["accum_steps"].clone()),
            (world.into(), (4 / world).into())
        );
    }
}

#[test]
fn a_resume_with_another_world_size_continues_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = shard_set(dir.path(), 3, 12, 2);
    let recipe = four_micro_batch_recipe();
    let straight = dir.path().join("straight");
    train(&options(recipe.clone(), &data, &straight)).unwrap();
    // Two ranks stop after update 3 (mid epoch 1); four ranks continue from step-3.
    let run = dir.path().join("run");
    let mut o = options(recipe.clone(), &data, &run);
    o.max_steps = Some(3);
    let s = train_threads(&o, 2).unwrap();
    assert_eq!((s.steps, s.interrupted), (3, true));
    let mut o = options(recipe.clone(), &data, &run);
    o.resume = true;
    let s = train_threads(&o, 4).unwrap();
    assert_eq!((s.steps, s.interrupted), (4, false));
    let ck = |d: &Path, f: &str| d.join("checkpoints").join(f);
    assert_same_trainable(
        &ck(&straight, "step-4.safetensors"),
        &ck(&run, "step-4.safetensors"),
    );
    assert_same_tensors(
        &ck(&straight, "step-4.optim.safetensors"),
        &ck(&run, "step-4.optim.safetensors"),
    );
}

#[test]
fn a_world_size_that_does_not_divide_the_update_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = shard_set(dir.path(), 3, 12, 2);
    let run = dir.path().join("run");
    let e = train_threads(&options(four_micro_batch_recipe(), &data, &run), 3)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("rank 0: ") && e.contains("cannot be shared by 3 ranks"),
        "{e}"
    );
}

#[test]
fn evaluation_split_over_ranks_equals_one_rank() {
    let dir = tempfile::tempdir().unwrap();
    // 3 classes x 7 validation images: 21 images, batches of 4 (the last one short).
    let data = shard_set(dir.path(), 3, 2, 7);
    let recipe = short_a3(1, 4, 1);
    let (val, classes) = trainer::train::open_split(&data, "val").unwrap();
    let (_, model) =
        trainer::train::build_model(&recipe, Some(&tiny_net()), classes, &Device::Cpu).unwrap();
    let feed = trainer::feed::Feed::new(&Device::Cpu).unwrap();
    let transform = trainer::train::eval_transform(32, 0.875, Interpolation::Bicubic).unwrap();
    let one =
        trainer::train::evaluate(&model, &feed, val.clone(), transform.clone(), 4, 2, 0).unwrap();
    assert_eq!(one.samples, 21);
    for world in [2usize, 3, 4] {
        let groups = ThreadGroup::new(world, std::time::Duration::from_secs(60));
        let results: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = groups
                .into_iter()
                .map(|mut g| {
                    let (m, f, v, t) = (&model, &feed, val.clone(), transform.clone());
                    s.spawn(move || evaluate_rank(m, f, v, t, 4, 1, 0, &mut g).unwrap())
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in results {
            // Bit for bit: the same batches, the same per-batch values, summed in batch order.
            assert_eq!(r, one, "world {world}");
            assert_eq!(r.loss.to_bits(), one.loss.to_bits());
        }
    }
}

#[test]
fn ranks_reducing_during_the_explicit_backward_train_what_one_rank_trains() {
    let dir = tempfile::tempdir().unwrap();
    let data = shard_set(dir.path(), 3, 12, 2);
    let recipe = four_micro_batch_recipe();
    // The fast path's structure on the CPU: channels-last, the explicit backward (its hook
    // starts the gradient buckets), buckets small enough that several start per backward.
    let opts = |run: &Path| {
        let mut o = options(recipe.clone(), &data, run);
        o.layout = Some(trainer::model::ActivationLayout::Nhwc);
        o.backward = trainer::model::BackwardMode::Explicit;
        o.bucket_bytes = 64 << 10;
        o
    };
    let one = dir.path().join("w1");
    train(&opts(&one)).unwrap();
    let two = dir.path().join("w2");
    train_threads(&opts(&two), 2).unwrap();
    let ck = |d: &Path, f: &str| d.join("checkpoints").join(f);
    assert_same_trainable(
        &ck(&one, "step-4.safetensors"),
        &ck(&two, "step-4.safetensors"),
    );
    assert_same_tensors(
        &ck(&one, "step-4.optim.safetensors"),
        &ck(&two, "step-4.optim.safetensors"),
    );
    assert_eq!(update_metrics(&one), update_metrics(&two));
}

/// With several ranks a stop request is acted on at the next metrics line, whose all-reduce
/// carries each rank's flag (ranks as threads share the flag here; separate processes each have
/// their own, and the sum makes any one of them stop all): both ranks stop after update 2, not
/// 1, the checkpoint there is written, the summary says why, and a resume on one rank ends with
/// the uninterrupted run's weights.
#[test]
fn a_stop_request_stops_every_rank_after_the_same_update() {
    use trainer::train::stop::StopSource;
    let dir = tempfile::tempdir().unwrap();
    let data = shard_set(dir.path(), 3, 12, 2);
    let recipe = four_micro_batch_recipe()
        .with_overrides(&["run.log_every_steps=2"])
        .unwrap();
    let straight = dir.path().join("straight");
    train(&options(recipe.clone(), &data, &straight)).unwrap();

    let run = dir.path().join("run");
    let mut o = options(recipe.clone(), &data, &run);
    let stop = StopSource::flag();
    stop.request(15); // SIGTERM, before the first update: seen at the first metrics line
    o.stop = stop;
    let s = train_threads(&o, 2).unwrap();
    assert_eq!(s.stopped_by.as_deref(), Some("SIGTERM"));
    assert_eq!(s.steps, 2, "the first metrics line is at update 2");
    let latest = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    assert_eq!(latest.trim(), "step-2");
    let last: serde_json::Value = metric_lines(&run).pop().unwrap();
    assert_eq!(
        (last["stopped"].as_str(), last["step"].as_u64()),
        (Some("SIGTERM"), Some(2))
    );

    let mut o = options(recipe, &data, &run);
    o.resume = true;
    let s = train(&o).unwrap();
    assert_eq!(s.stopped_by, None);
    let ck = |d: &Path, f: &str| d.join("checkpoints").join(f);
    let f = format!("step-{}.safetensors", s.steps);
    assert_same_trainable(&ck(&straight, &f), &ck(&run, &f));
}

/// Fine-tuning (`init_from`): a run on a data set of 4 classes started from a 3-class run's
/// checkpoint loads every trunk tensor bit for bit and re-initialises the classifier (timm's
/// init: the same values as a fresh run's); with the same class count everything is loaded, so
/// the evaluation logits equal the checkpoint's. The start is recorded in `init-from.json`, and
/// a tensor that does not fit (another network) is an error naming the key.
#[test]
fn a_fine_tuning_run_starts_from_the_given_weights() {
    use trainer::checkpoint::{load_weights_replacing, CLASSIFIER};
    let dir = tempfile::tempdir().unwrap();
    let (four, recipe, weights) = pretrained_on_three(dir.path());
    let saved = load(&weights);

    // 4 classes: the trunk is the checkpoint's, the classifier a fresh init.
    let (vm, _) = trainer::train::build_model(&recipe, Some(&tiny_net()), 4, &Device::Cpu).unwrap();
    let fresh_fc = vm.data().lock().unwrap()["fc.weight"].as_tensor().clone();
    let replaced = load_weights_replacing(&vm, &weights, &CLASSIFIER).unwrap();
    assert_eq!(replaced, ["fc.weight", "fc.bias"]);
    let data = vm.data().lock().unwrap();
    for (name, var) in data.iter() {
        let bits = |t: &Tensor| -> Vec<u32> {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        if name.starts_with("fc.") {
            assert_eq!(var.dims()[0], 4, "{name}");
        } else {
            assert!(bits(var.as_tensor()) == bits(&saved[name]), "{name}");
        }
    }
    assert!(bits_equal(
        &data["fc.weight"].as_tensor().clone(),
        &fresh_fc
    ));
    drop(data);

    // Same classes: everything loaded, so the logits are the checkpoint's.
    let (a, mut ma) =
        trainer::train::build_model(&recipe, Some(&tiny_net()), 3, &Device::Cpu).unwrap();
    let (b, mut mb) =
        trainer::train::build_model(&recipe, Some(&tiny_net()), 3, &Device::Cpu).unwrap();
    trainer::checkpoint::load_weights(&a, &weights).unwrap();
    assert!(load_weights_replacing(&b, &weights, &CLASSIFIER)
        .unwrap()
        .is_empty());
    ma.set_layout(trainer::model::ActivationLayout::Nchw);
    mb.set_layout(trainer::model::ActivationLayout::Nchw);
    let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
    let (la, lb) = (ma.forward_eval(&x).unwrap(), mb.forward_eval(&x).unwrap());
    assert!(bits_equal(&la, &lb));

    // The run itself: it records where it started, then trains on the 4 classes.
    let ft = dir.path().join("ft");
    let mut o = options(recipe.clone(), &four, &ft);
    o.init_from = Some(weights.clone());
    let s = train(&o).unwrap();
    assert!(s.steps > 0);
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ft.join("init-from.json")).unwrap()).unwrap();
    assert_eq!(rec["replaced"], serde_json::json!(["fc.weight", "fc.bias"]));
    assert_eq!(rec["num_classes"], 4);
    assert_eq!(rec["sha256"].as_str().unwrap().len(), 64);

    // Another network's weights: an error naming a key.
    let (other, _) = trainer::train::build_model(
        &recipe,
        Some(&trainer::model::ResNetConfig::by_name("resnet18").unwrap()),
        3,
        &Device::Cpu,
    )
    .unwrap();
    let e = load_weights_replacing(&other, &weights, &CLASSIFIER)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing") || e.contains("expected shape"), "{e}");
}

fn bits_equal(a: &Tensor, b: &Tensor) -> bool {
    let f = |t: &Tensor| -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    };
    a.dims() == b.dims() && f(a) == f(b)
}

/// The fine-tuning tests' start: a 3-class set and a 4-class set under `dir`, a short A3 run on
/// the 3 classes; returns the 4-class shards, the recipe and the run's latest weights.
fn pretrained_on_three(dir: &Path) -> (PathBuf, Recipe, PathBuf) {
    let three = shard_set(&dir.join("three"), 3, 8, 2);
    let four = shard_set(&dir.join("four"), 4, 6, 2);
    let recipe = short_a3(2, 4, 1);
    let pre = dir.join("pre");
    train(&options(recipe.clone(), &three, &pre)).unwrap();
    (four, recipe, latest_weights(&pre))
}

/// The weights of the latest checkpoint of a run.
fn latest_weights(run_dir: &Path) -> PathBuf {
    let latest = std::fs::read_to_string(run_dir.join("checkpoints/latest")).unwrap();
    run_dir
        .join("checkpoints")
        .join(format!("{}.safetensors", latest.trim()))
}

/// The recipe's `finetune` section in a run: with the trunk frozen for the whole run only the new
/// classifier learns (every trunk weight bit-equal to the checkpoint's, while the BatchNorm
/// running statistics follow the new data, as in PyTorch); a lower trunk rate moves the trunk
/// less than the classifier's rate does.
#[test]
fn a_frozen_trunk_stays_as_loaded_and_a_lower_rate_moves_it_less() {
    use trainer::model::is_running_stat;
    let dir = tempfile::tempdir().unwrap();
    let (four, recipe, weights) = pretrained_on_three(dir.path());
    let saved = load(&weights);
    let (fresh, _) =
        trainer::train::build_model(&recipe, Some(&tiny_net()), 4, &Device::Cpu).unwrap();
    let fresh_fc = fresh.data().lock().unwrap()["fc.weight"]
        .as_tensor()
        .clone();

    let fine_tune = |name: &str, set: &[&str]| {
        let run_dir = dir.path().join(name);
        let mut o = options(recipe.with_overrides(set).unwrap(), &four, &run_dir);
        o.init_from = Some(weights.clone());
        assert!(train(&o).unwrap().steps > 0);
        load(&latest_weights(&run_dir))
    };
    let frozen = fine_tune("frozen", &["finetune.freeze_trunk_epochs=2"]);
    let mut stats_moved = 0;
    for (name, t) in &frozen {
        if name.starts_with("fc.") {
            assert_eq!(t.dims()[0], 4, "{name}");
        } else if is_running_stat(name) {
            stats_moved += usize::from(!bits_equal(t, &saved[name]));
        } else {
            assert!(
                bits_equal(t, &saved[name]),
                "{name}: a frozen trunk weight changed"
            );
        }
    }
    assert!(
        !bits_equal(&frozen["fc.weight"], &fresh_fc),
        "the classifier must learn"
    );
    assert!(
        stats_moved > 0,
        "the running statistics follow the new data"
    );

    // One rate for all, then the trunk at a tenth of it: the trunk moves less.
    let distance = |w: &HashMap<String, Tensor>| -> f64 {
        w.iter()
            .filter(|(n, _)| !n.starts_with("fc.") && !is_running_stat(n))
            .map(|(n, t)| {
                let d = (t - &saved[n]).unwrap().sqr().unwrap().sum_all().unwrap();
                d.to_scalar::<f32>().unwrap() as f64
            })
            .sum::<f64>()
            .sqrt()
    };
    let full = distance(&fine_tune("full", &[]));
    let tenth = distance(&fine_tune("tenth", &["finetune.trunk_lr_scale=0.1"]));
    assert!(
        full > 0.0 && tenth > 0.0 && tenth < 0.5 * full,
        "{tenth} vs {full}"
    );
}

/// BatchNorm re-estimation (`finetune.bn_reestimate_batches`): the stem's running mean and
/// variance become the average over the batches of the per-batch mean and unbiased variance of
/// the stem convolution's output, computed here independently with candle's NCHW conv; nothing
/// else changes. A run records the option in its recipe.
#[test]
fn batchnorm_statistics_are_re_estimated_on_the_new_data() {
    use trainer::model::{is_running_stat, ActivationLayout};
    use trainer::train::finetune::{reestimate_bn, BnEstimate};
    let dir = tempfile::tempdir().unwrap();
    let four = shard_set(&dir.path().join("four"), 4, 6, 2);
    let recipe = short_a3(2, 4, 1);
    let (vm, mut model) =
        trainer::train::build_model(&recipe, Some(&tiny_net()), 4, &Device::Cpu).unwrap();
    model.set_layout(ActivationLayout::Nhwc);
    let before: HashMap<String, Tensor> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().copy().unwrap()))
        .collect();
    let (split, _) = trainer::train::open_split(&four, "train").unwrap();
    let transform = trainer::train::eval_transform(32, 0.95, Interpolation::Bicubic).unwrap();
    let feed = trainer::feed::Feed::new(&Device::Cpu).unwrap();
    let est = reestimate_bn(
        &model,
        &vm,
        &feed,
        split.clone(),
        transform.clone(),
        (4, 2, 3),
    )
    .unwrap();
    assert_eq!(
        est,
        BnEstimate {
            batches: 3,
            images: 12,
            layers: 12
        }
    );

    // Independently: the stem conv on the same images, per-batch statistics averaged.
    let w = before["conv1.weight"].clone();
    let mut loader = trainer::train::eval_loader(split, transform, 4, 2, 12, (0, 1)).unwrap();
    let (mut mean, mut var) = (vec![0f64; 64], vec![0f64; 64]);
    for batch in loader.epoch(0).unwrap() {
        let batch = batch.unwrap();
        let xs = feed
            .images_for(batch.images(), batch.len, 32, ActivationLayout::Nchw)
            .unwrap();
        let y = xs.conv2d(&w, 3, 2, 1, 1).unwrap(); // [4, 64, 16, 16]
        let y = y.transpose(0, 1).unwrap().flatten_from(1).unwrap(); // [64, n]
        let rows: Vec<Vec<f32>> = y.to_vec2().unwrap();
        for (c, row) in rows.iter().enumerate() {
            let n = row.len() as f64;
            let m = row.iter().map(|&v| v as f64).sum::<f64>() / n;
            let v = row.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / (n - 1.0);
            mean[c] += m / 3.0;
            var[c] += v / 3.0;
        }
    }
    let data = vm.data().lock().unwrap();
    let got = |name: &str| -> Vec<f32> { data[name].as_tensor().to_vec1().unwrap() };
    for (name, want) in [("bn1.running_mean", &mean), ("bn1.running_var", &var)] {
        let scale = want.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
        for (c, (g, w)) in got(name).iter().zip(want.iter()).enumerate() {
            // f32 convolutions summed in another order: agreement to 1e-4 of the largest value.
            assert!(
                (*g as f64 - w).abs() <= 1e-4 * scale,
                "{name}[{c}]: {g} vs {w}"
            );
        }
    }
    for (name, var) in data.iter() {
        if !is_running_stat(name) {
            assert!(bits_equal(var.as_tensor(), &before[name]), "{name} changed");
        } else if name.ends_with("running_var") {
            assert!(!bits_equal(var.as_tensor(), &before[name]), "{name} kept");
        }
    }
    drop(data);

    // In a run: recorded in its recipe.
    let run_dir = dir.path().join("run");
    let o = options(
        recipe
            .with_overrides(&["finetune.bn_reestimate_batches=2"])
            .unwrap(),
        &four,
        &run_dir,
    );
    assert!(train(&o).unwrap().steps > 0);
    let toml = std::fs::read_to_string(run_dir.join("recipe.toml")).unwrap();
    assert!(toml.contains("bn_reestimate_batches = 2"), "{toml}");
}

/// The other families through the same trainer: a RegNetY and an EfficientNet train (and
/// evaluate) from `model.name`, and a fine-tuning run from the checkpoint replaces the classifier
/// (`head.fc`, `classifier`) for a new class count, the trunk loaded.
#[test]
fn a_regnet_and_an_efficientnet_train_and_fine_tune_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let three = shard_set(&dir.path().join("three"), 3, 8, 2);
    let four = shard_set(&dir.path().join("four"), 4, 6, 2);
    for (model, trunk_key, head) in [
        ("regnety_002", "s4.b1.se.fc1.weight", "head.fc"),
        (
            "efficientnet_b0",
            "blocks.6.0.se.conv_reduce.weight",
            "classifier",
        ),
    ] {
        let recipe = short_a3(2, 4, 1)
            .with_overrides(&[format!("model.name=\"{model}\"")])
            .unwrap();
        let pre = dir.path().join(model).join("pre");
        let mut o = TrainOptions::new(recipe.clone(), &three, &pre);
        o.progress = Progress::Quiet;
        assert!(train(&o).unwrap().steps > 0, "{model}");
        let weights = latest_weights(&pre);
        let saved = load(&weights);
        assert!(saved.contains_key(trunk_key), "{model}");
        assert_eq!(saved[&format!("{head}.weight")].dims()[0], 3, "{model}");

        let ft = dir.path().join(model).join("ft");
        let mut o = TrainOptions::new(recipe, &four, &ft);
        o.progress = Progress::Quiet;
        o.init_from = Some(weights);
        assert!(train(&o).unwrap().steps > 0, "{model}");
        let rec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(ft.join("init-from.json")).unwrap()).unwrap();
        assert_eq!(
            rec["replaced"],
            serde_json::json!([format!("{head}.weight"), format!("{head}.bias")]),
            "{model}"
        );
        let lines = metric_lines(&ft);
        assert!(lines.iter().any(|l| l.get("top1").is_some()), "{model}");
    }
}

/// A Vision Transformer trains by name at 32 px (a 2x2 grid of 16 px patches), is evaluated at
/// 48 px through the resampled position embedding, and fine-tunes onto four classes with its
/// `head` replaced and everything else, the 2x2 embedding included, loaded.
#[test]
fn a_vision_transformer_trains_evaluates_at_another_size_and_fine_tunes() {
    let dir = tempfile::tempdir().unwrap();
    let three = shard_set(&dir.path().join("three"), 3, 8, 2);
    let four = shard_set(&dir.path().join("four"), 4, 6, 2);
    let recipe = short_a3(2, 4, 1)
        .with_overrides(&[
            "model.name=\"vit_tiny_patch16_224\"".to_string(),
            "data.test_size_px=48".into(),
        ])
        .unwrap();
    let pre = dir.path().join("pre");
    let mut o = TrainOptions::new(recipe.clone(), &three, &pre);
    o.progress = Progress::Quiet;
    let summary = train(&o).unwrap();
    assert!(summary.steps > 0);
    assert!(summary.last_eval.is_some(), "evaluated at 48 px");
    let weights = latest_weights(&pre);
    let saved = load(&weights);
    assert_eq!(
        saved["pos_embed"].dims(),
        [1, 5, 192],
        "built at the 32 px grid"
    );
    assert_eq!(saved["head.weight"].dims(), [3, 192]);
    // Evaluation builds at the stored grid whatever the recipe's training size (A3's 160 px).
    let (_, net) = trainer::train::build_model_for_weights(
        &Recipe::a3()
            .with_overrides(&["model.name=\"vit_tiny_patch16_224\"".to_string()])
            .unwrap(),
        None,
        3,
        &Device::Cpu,
        &weights,
    )
    .unwrap();
    let pos = net.params().iter().find(|p| p.name == "pos_embed").unwrap();
    assert_eq!(pos.tensor.dims(), [1, 5, 192]);

    let ft = dir.path().join("ft");
    let mut o = TrainOptions::new(recipe, &four, &ft);
    o.progress = Progress::Quiet;
    o.init_from = Some(weights);
    assert!(train(&o).unwrap().steps > 0);
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ft.join("init-from.json")).unwrap()).unwrap();
    assert_eq!(
        rec["replaced"],
        serde_json::json!(["head.weight", "head.bias"])
    );
}
