//! Optimizer behaviour beyond the golden values: checkpoint round trips, skipped steps, state
//! errors, BatchNorm buffers of a candle-nn model, and a small end-to-end fit.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, ModuleT, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use trainer::loss::{BinaryCrossEntropy, Targets};
use trainer::optim::{
    param_groups, Lamb, LambConfig, OptimError, ParamGroup, Sgd, SgdConfig, TrainOptimizer,
};

fn groups(seed: u64) -> Vec<ParamGroup> {
    let dev = Device::Cpu;
    let mut vars = Vec::new();
    for (i, (name, shape)) in [
        ("conv.weight", vec![4usize, 3, 3, 3]),
        ("bn.weight", vec![4]),
        ("fc.weight", vec![5, 4]),
        ("fc.bias", vec![5]),
    ]
    .into_iter()
    .enumerate()
    {
        // Deterministic values in [-1, 1) from a multiplicative hash of the index.
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|k| (((k as u64 * 2654435761 + seed + i as u64 * 97) % 1000) as f32 / 500.0) - 1.0)
            .collect();
        let t = Tensor::from_vec(v, shape, &dev).unwrap();
        vars.push((name.to_string(), Var::from_tensor(&t).unwrap()));
    }
    param_groups(vars, 0.02)
}

/// Gradients of the loss `sum(w * c_k)` with fixed coefficients, so `grad = c_k`.
fn grads_for(groups: &[ParamGroup], k: usize, scale: f64) -> candle_core::backprop::GradStore {
    let mut loss: Option<Tensor> = None;
    for (j, p) in groups.iter().flat_map(|g| &g.params).enumerate() {
        let w = p.var.as_tensor();
        let c = (w.ones_like().unwrap() * (scale * ((k + j) as f64 * 0.37).sin())).unwrap();
        let term = (w * c).unwrap().sum_all().unwrap();
        loss = Some(match loss {
            None => term,
            Some(l) => (l + term).unwrap(),
        });
    }
    loss.unwrap().backward().unwrap()
}

fn values(groups: &[ParamGroup]) -> Vec<Vec<f32>> {
    groups
        .iter()
        .flat_map(|g| &g.params)
        .map(|p| p.var.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

fn copy_groups(src: &[ParamGroup]) -> Vec<ParamGroup> {
    src.iter()
        .map(|g| ParamGroup {
            weight_decay: g.weight_decay,
            lr_scale: g.lr_scale,
            params: g
                .params
                .iter()
                .map(|p| trainer::optim::NamedVar {
                    name: p.name.clone(),
                    var: Var::from_tensor(&p.var.as_tensor().copy().unwrap()).unwrap(),
                })
                .collect(),
        })
        .collect()
}

fn resume_is_exact<O: TrainOptimizer>(make: impl Fn(Vec<ParamGroup>) -> O) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optim.safetensors");
    let lr = [0.1, 0.05, 0.2, 0.1, 0.3];

    let straight = groups(1);
    let mut opt = make(straight.clone());
    for (k, lr) in lr.iter().enumerate() {
        opt.step(&grads_for(&straight, k, 1.5), *lr).unwrap();
    }

    let first = groups(1);
    let mut opt = make(first.clone());
    for (k, lr) in lr.iter().enumerate().take(2) {
        opt.step(&grads_for(&first, k, 1.5), *lr).unwrap();
    }
    // Checkpoint: parameters (copied) and optimizer state through safetensors on disk.
    let state: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
    candle_core::safetensors::save(&state, &path).unwrap();
    let resumed = copy_groups(&first);
    drop(opt);
    let mut opt = make(resumed.clone());
    let loaded = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    opt.load_state(&loaded).unwrap();
    assert_eq!(opt.num_steps(), 2);
    for (k, lr) in lr.iter().enumerate().skip(2) {
        opt.step(&grads_for(&resumed, k, 1.5), *lr).unwrap();
    }
    assert_eq!(opt.num_steps(), 5);
    assert_eq!(
        values(&resumed),
        values(&straight),
        "resume must be bit-exact"
    );
}

#[test]
fn lamb_resume_is_bit_exact() {
    resume_is_exact(|g| Lamb::new(g, LambConfig::default()).unwrap());
}

#[test]
fn sgd_resume_is_bit_exact() {
    resume_is_exact(|g| {
        let config = SgdConfig {
            nesterov: true,
            ..SgdConfig::default()
        };
        Sgd::new(g, config).unwrap()
    });
}

#[test]
fn non_finite_gradients_skip_the_step() {
    let g = groups(2);
    let mut opt = Lamb::new(g.clone(), LambConfig::default()).unwrap();
    opt.step(&grads_for(&g, 0, 1.0), 0.1).unwrap();
    let before = values(&g);
    let state_before = opt.state_tensors();
    for bad in [f64::NAN, f64::INFINITY] {
        let mut grads = grads_for(&g, 1, 1.0);
        let w = g[1].params[0].var.as_tensor();
        grads.insert(w, (w.ones_like().unwrap() * bad).unwrap());
        let report = opt.step(&grads, 0.1).unwrap();
        assert!(!report.applied);
        assert!(!report.grad_norm.is_finite());
        assert_eq!(report.step, 1);
    }
    assert_eq!(values(&g), before);
    assert_eq!(opt.num_steps(), 1);
    let state_after = opt.state_tensors();
    assert_eq!(state_before.len(), state_after.len());
    for ((k1, t1), (k2, t2)) in state_before.iter().zip(&state_after) {
        assert_eq!(k1, k2);
        assert_eq!(
            t1.flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap(),
            t2.flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        );
    }
    // The next finite step proceeds as step 2.
    let report = opt.step(&grads_for(&g, 1, 1.0), 0.1).unwrap();
    assert!(report.applied && report.step == 2);
}

#[test]
fn clip_reported_only_above_max_norm() {
    let g = groups(3);
    let mut opt = Lamb::new(g.clone(), LambConfig::default()).unwrap();
    let big = opt.step(&grads_for(&g, 0, 1.0), 0.1).unwrap();
    assert!(big.grad_norm > 1.0);
    assert!((big.clip_factor - big.grad_norm).abs() < 1e-12);
    let small = opt.step(&grads_for(&g, 0, 1e-3), 0.1).unwrap();
    assert!(small.grad_norm < 1.0);
    assert_eq!(small.clip_factor, 1.0);
}

#[test]
fn load_state_checks_before_changing_anything() {
    let g = groups(4);
    let mut opt = Lamb::new(g.clone(), LambConfig::default()).unwrap();
    opt.step(&grads_for(&g, 0, 1.0), 0.1).unwrap();
    let good: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
    assert!(good.contains_key("exp_avg.conv.weight") && good.contains_key("exp_avg_sq.fc.bias"));

    let mut fresh = Lamb::new(groups(4), LambConfig::default()).unwrap();
    let mut bad = good.clone();
    bad.insert(
        "exp_avg.layer9.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = fresh.load_state(&bad).unwrap_err();
    assert!(
        matches!(&e, OptimError::UnexpectedState { key } if key == "exp_avg.layer9.weight"),
        "{e}"
    );

    let mut bad = good.clone();
    bad.insert(
        "exp_avg.fc.bias".into(),
        Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = fresh.load_state(&bad).unwrap_err();
    assert_eq!(
        e.to_string(),
        "optimizer state \"exp_avg.fc.bias\": expected shape [5], found [4]"
    );

    let mut bad = good.clone();
    bad.remove("exp_avg_sq.fc.weight");
    let e = fresh.load_state(&bad).unwrap_err();
    assert!(
        matches!(&e, OptimError::MissingState { key } if key == "exp_avg_sq.fc.weight"),
        "{e}"
    );

    let mut bad = good.clone();
    bad.remove("step");
    assert!(matches!(
        fresh.load_state(&bad),
        Err(OptimError::MissingState { .. })
    ));
    assert_eq!(fresh.num_steps(), 0);
    assert_eq!(
        fresh.state_tensors().len(),
        1,
        "failed loads leave no state behind"
    );

    fresh.load_state(&good).unwrap();
    assert_eq!(fresh.num_steps(), 1);
}

#[test]
fn rejects_low_precision_and_duplicate_params() {
    let dev = Device::Cpu;
    let bf16 = Var::zeros((2, 2), DType::BF16, &dev).unwrap();
    let groups = param_groups(vec![("w".to_string(), bf16)], 0.1);
    let e = Lamb::new(groups, LambConfig::default()).unwrap_err();
    assert!(
        e.to_string().contains("needs f32 (master) parameters"),
        "{e}"
    );

    let v = Var::zeros((2, 2), DType::F32, &dev).unwrap();
    let g = param_groups(
        vec![("w".to_string(), v.clone()), ("w".to_string(), v)],
        0.1,
    );
    assert!(matches!(
        Sgd::new(g, SgdConfig::default()),
        Err(OptimError::DuplicateName(_))
    ));
}

/// A candle-nn conv + BatchNorm + linear model, built through a `VarMap` as the trainer will.
/// BatchNorm's running statistics are `Var`s in the map and must stay out of the optimizer.
#[test]
fn varmap_model_trains_with_bce_and_lamb() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let conv = candle_nn::conv2d(3, 8, 3, Default::default(), vb.pp("conv1")).unwrap();
    let bn = candle_nn::batch_norm(8, 1e-5, vb.pp("bn1")).unwrap();
    let fc = candle_nn::linear(8, 4, vb.pp("fc")).unwrap();

    let named: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert!(named.iter().any(|(k, _)| k == "bn1.running_mean"));
    let groups = param_groups(named, 0.01);
    let names: Vec<Vec<&str>> = groups
        .iter()
        .map(|g| g.params.iter().map(|p| p.name.as_str()).collect())
        .collect();
    assert_eq!(
        names[0],
        ["bn1.bias", "bn1.weight", "conv1.bias", "fc.bias"]
    );
    assert_eq!(names[1], ["conv1.weight", "fc.weight"]);

    let mut opt = Lamb::new(groups, LambConfig::default()).unwrap();
    let xs = Tensor::randn(0f32, 1.0, (8, 3, 6, 6), &dev).unwrap();
    let labels = Tensor::new(&[0u32, 1, 2, 3, 0, 1, 2, 3], &dev).unwrap();
    let bce = BinaryCrossEntropy {
        smoothing: 0.1,
        target_threshold: Some(0.2),
    };
    let forward = |xs: &Tensor| -> Tensor {
        let h = conv.forward(xs).unwrap();
        let h = bn.forward_t(&h, true).unwrap().relu().unwrap();
        let h = h.mean(D::Minus1).unwrap().mean(D::Minus1).unwrap();
        fc.forward(&h).unwrap()
    };
    let mut losses = Vec::new();
    for _ in 0..30 {
        let loss = bce
            .forward(&forward(&xs), Targets::Classes(&labels))
            .unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        let report = opt.step(&loss.backward().unwrap(), 2e-2).unwrap();
        assert!(report.applied);
    }
    // Random init and inputs (candle's CPU RNG cannot be seeded): a loose bound.
    assert!(
        losses[29] < 0.75 * losses[0],
        "loss should fall: {} -> {}",
        losses[0],
        losses[29]
    );
    // The running statistics were updated by BatchNorm itself, not by LAMB (no state for them).
    let state: Vec<String> = opt.state_tensors().into_iter().map(|(k, _)| k).collect();
    assert!(!state.iter().any(|k| k.contains("running")), "{state:?}");
}

/// Time of one LAMB step over ResNet-50-sized parameters (25.6 M in 161 tensors) on the CPU.
/// Ignored by default; run with `cargo test -p trainer --test optim -- --ignored --nocapture`.
#[test]
#[ignore]
fn lamb_step_time_resnet50_sized() {
    let dev = Device::Cpu;
    // Shapes of timm resnet50: conv weights, BN weight/bias, fc.
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("conv1.weight".into(), vec![64, 3, 7, 7]),
        ("bn1.weight".into(), vec![64]),
        ("bn1.bias".into(), vec![64]),
    ];
    let mut in_ch = 64;
    for (stage, (blocks, width)) in [(3, 64), (4, 128), (6, 256), (3, 512)].iter().enumerate() {
        for b in 0..*blocks {
            let out = width * 4;
            let p = format!("layer{}.{b}", stage + 1);
            for (k, (o, i, kh)) in [(*width, in_ch, 1), (*width, *width, 3), (out, *width, 1)]
                .iter()
                .enumerate()
            {
                shapes.push((format!("{p}.conv{}.weight", k + 1), vec![*o, *i, *kh, *kh]));
                shapes.push((format!("{p}.bn{}.weight", k + 1), vec![*o]));
                shapes.push((format!("{p}.bn{}.bias", k + 1), vec![*o]));
            }
            if b == 0 {
                shapes.push((format!("{p}.downsample.0.weight"), vec![out, in_ch, 1, 1]));
                shapes.push((format!("{p}.downsample.1.weight"), vec![out]));
                shapes.push((format!("{p}.downsample.1.bias"), vec![out]));
            }
            in_ch = out;
        }
    }
    shapes.push(("fc.weight".into(), vec![1000, 2048]));
    shapes.push(("fc.bias".into(), vec![1000]));
    let vars: Vec<(String, Var)> = shapes
        .into_iter()
        .map(|(n, s)| (n, Var::randn(0f32, 0.02, s, &dev).unwrap()))
        .collect();
    let numel: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let groups = param_groups(vars, 0.01);
    let mut grads = grads_for(&groups, 0, 1e-3);
    for p in groups.iter().flat_map(|g| &g.params) {
        let w = p.var.as_tensor();
        grads.insert(w, w.randn_like(0.0, 1e-3).unwrap());
    }
    let mut opt = Lamb::new(groups, LambConfig::default()).unwrap();
    opt.step(&grads, 5e-3).unwrap();
    let start = std::time::Instant::now();
    let n = 3;
    for _ in 0..n {
        opt.step(&grads, 5e-3).unwrap();
    }
    let per_step = start.elapsed().as_secs_f64() / n as f64;
    eprintln!("lamb step over {numel} params: {:.3} s", per_step);
}

/// LAMB's fused CPU step (tensors of several chunks, a trust ratio and a plain Adam-style
/// group) in rayon pools of 1, 2 and 3 threads: the weights and the moments are the same bits.
#[test]
fn lamb_does_not_depend_on_the_thread_count() {
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| {
                let dev = Device::Cpu;
                let mut vars = Vec::new();
                for (i, (name, shape)) in [
                    ("conv.weight", vec![64usize, 32, 3, 3]),
                    ("fc.weight", vec![300, 200]),
                    ("fc.bias", vec![300]),
                ]
                .into_iter()
                .enumerate()
                {
                    let n: usize = shape.iter().product();
                    let v: Vec<f32> = (0..n)
                        .map(|k| ((k * 7919 + i * 31) % 2001) as f32 / 1000.0 - 1.0)
                        .collect();
                    let t = Tensor::from_vec(v, shape, &dev).unwrap();
                    vars.push((name.to_string(), Var::from_tensor(&t).unwrap()));
                }
                let g = param_groups(vars, 0.02);
                let mut opt = Lamb::new(g.clone(), LambConfig::default()).unwrap();
                for k in 0..3 {
                    // Gradients that differ per element: d/dw of sum(w^2 * c_k) / 2.
                    let mut loss: Option<Tensor> = None;
                    for p in g.iter().flat_map(|g| &g.params) {
                        let w = p.var.as_tensor();
                        let term = ((w.sqr().unwrap() * (0.3 + 0.2 * k as f64)).unwrap())
                            .sum_all()
                            .unwrap();
                        loss = Some(match loss {
                            None => term,
                            Some(l) => (l + term).unwrap(),
                        });
                    }
                    opt.step(&loss.unwrap().backward().unwrap(), 0.01).unwrap();
                }
                let state: Vec<Vec<u32>> = opt
                    .state_tensors()
                    .into_iter()
                    .filter(|(k, _)| k != "step")
                    .map(|(_, t)| {
                        t.flatten_all()
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap()
                            .iter()
                            .map(|v| v.to_bits())
                            .collect()
                    })
                    .collect();
                (values(&g), state)
            })
    };
    let one = run(1);
    for t in [2, 3] {
        assert!(run(t) == one, "{t} threads differ from 1");
    }
}

/// Gradients of `sum(w * c)` with `c` drawn from the parameter's name and `k`, so that the same
/// parameter gets the same gradient whatever the order of the groups.
fn grads_by_name(groups: &[ParamGroup], k: usize) -> candle_core::backprop::GradStore {
    let mut loss: Option<Tensor> = None;
    for p in groups.iter().flat_map(|g| &g.params) {
        let h = p.name.bytes().fold(k as u64 + 7, |h, b| h * 31 + b as u64);
        let c = ((h % 1000) as f64 / 500.0 - 1.0) * 0.3;
        let w = p.var.as_tensor();
        let term = (w * c).unwrap().sum_all().unwrap();
        loss = Some(match loss {
            None => term,
            Some(l) => (l + term).unwrap(),
        });
    }
    loss.unwrap().backward().unwrap()
}

fn values_by_name(groups: &[ParamGroup]) -> HashMap<String, Vec<f32>> {
    groups
        .iter()
        .flat_map(|g| &g.params)
        .map(|p| {
            let v = p.var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            (p.name.clone(), v)
        })
        .collect()
}

/// Fine-tuning's lower trunk rate: after `scale_trunk_lr(groups, 0.5, fc)` and steps at rate
/// `2 lr`, the trunk holds what a run at `lr` gives and the head what a run at `2 lr` gives, bit
/// for bit (halving is exact; gradients, clipping and trust ratios do not depend on the rate).
fn trunk_rate_is_scaled<O: TrainOptimizer>(make: impl Fn(Vec<ParamGroup>) -> O) {
    use trainer::optim::scale_trunk_lr;
    let is_head = |n: &str| n.starts_with("fc.");
    let lrs = [0.1, 0.05, 0.2];
    let run = |groups: Vec<ParamGroup>, factor: f64| {
        let mut opt = make(groups.clone());
        for (k, lr) in lrs.iter().enumerate() {
            assert!(
                opt.step(&grads_by_name(&groups, k), lr * factor)
                    .unwrap()
                    .applied
            );
        }
        values_by_name(&groups)
    };
    let at_lr = run(groups(3), 1.0);
    let at_2lr = run(groups(3), 2.0);
    let split = scale_trunk_lr(groups(3), 0.5, is_head);
    assert_eq!(
        split.len(),
        4,
        "each weight-decay group splits into trunk and head"
    );
    let mixed = run(split, 2.0);
    assert_eq!(mixed.len(), 4);
    for (name, v) in &mixed {
        let want = if is_head(name) { &at_2lr } else { &at_lr };
        assert_eq!(v, &want[name], "{name}");
        assert_ne!(
            at_lr[name], at_2lr[name],
            "{name}: the two rates must differ"
        );
    }
}

#[test]
fn lamb_steps_the_trunk_at_its_scaled_rate() {
    trunk_rate_is_scaled(|g| Lamb::new(g, LambConfig::default()).unwrap());
}

#[test]
fn sgd_steps_the_trunk_at_its_scaled_rate() {
    trunk_rate_is_scaled(|g| Sgd::new(g, SgdConfig::default()).unwrap());
}
