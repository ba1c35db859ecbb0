//! `CudaLamb` against the CPU `Lamb`: several steps over random tensors (several chunks, a tensor
//! without weight decay, a parameter without gradient, clipping on and off, a non-finite skip),
//! checkpoint state in both directions, determinism and other configurations.
//!
//! Needs a GPU; without one (`Device::new_cuda(0)` fails) every test prints a message and passes.
#![cfg(feature = "cuda")]

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use trainer::cuda::lamb::{CudaLamb, CHUNK_ELEMS};
use trainer::optim::{Lamb, LambConfig, NamedVar, ParamGroup, StepReport, TrainOptimizer};

fn gpu() -> Option<Device> {
    match trainer::cuda::device::open(0) {
        Ok(d) => Some(d),
        Err(e) => {
            let e = e.to_string();
            println!(
                "SKIPPED: no CUDA device ({})",
                e.lines().next().unwrap_or("")
            );
            None
        }
    }
}

/// Deterministic values in [-1, 1) (splitmix64).
fn uniform(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// (name, shape, group): group 0 has weight decay, group 1 none.
const PARAMS: &[(&str, &[usize], usize)] = &[
    ("conv.weight", &[32, 16, 3, 3], 0),
    ("bn.weight", &[32], 1),
    ("bn.bias", &[32], 1),
    // More than two chunks.
    ("fc.weight", &[100, 400], 0),
    ("fc.bias", &[100], 1),
    // Exactly one chunk, and a tensor that never gets a gradient.
    ("exact.weight", &[CHUNK_ELEMS / 64, 64], 0),
    ("unused.weight", &[7, 5], 0),
];

fn groups(dev: &Device, wd: f64) -> Vec<ParamGroup> {
    let mut gs = vec![
        ParamGroup {
            weight_decay: wd,
            lr_scale: 1.0,
            params: vec![],
        },
        ParamGroup {
            weight_decay: 0.0,
            lr_scale: 1.0,
            params: vec![],
        },
    ];
    for (i, &(name, shape, g)) in PARAMS.iter().enumerate() {
        let n = shape.iter().product();
        let t = Tensor::from_vec(uniform(1000 + i as u64, n), shape, dev).unwrap();
        gs[g].params.push(NamedVar {
            name: name.to_string(),
            var: Var::from_tensor(&t).unwrap(),
        });
    }
    gs
}

fn vars(groups: &[ParamGroup]) -> Vec<&Var> {
    groups
        .iter()
        .flat_map(|g| &g.params)
        .map(|p| &p.var)
        .collect()
}

/// Gradients for step `k` with norm about `scale` per element; `nan` puts a NaN into one.
fn grads(groups: &[ParamGroup], k: u64, scale: f32, nan: bool) -> GradStore {
    let mut store = GradStore::default();
    for (i, p) in groups.iter().flat_map(|g| &g.params).enumerate() {
        if p.name == "unused.weight" || (k == 2 && p.name == "fc.bias") {
            continue; // no gradient (fc.bias only at step 2)
        }
        let w = p.var.as_tensor();
        let mut v: Vec<f32> = uniform(k * 100 + i as u64, w.elem_count())
            .into_iter()
            .map(|x| x * scale)
            .collect();
        if nan && p.name == "fc.weight" {
            v[123] = f32::NAN;
        }
        let g = if k == 1 && p.name == "fc.weight" {
            // A non-contiguous gradient (the transpose of a contiguous one).
            let (r, c) = w.dims2().unwrap();
            Tensor::from_vec(v, (c, r), w.device())
                .unwrap()
                .t()
                .unwrap()
        } else {
            Tensor::from_vec(v, w.shape(), w.device()).unwrap()
        };
        store.insert(w, g);
    }
    store
}

fn host(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Largest |a - b| over a pair of tensors, relative to the largest |b| of that tensor (at least
/// `floor`): reductions in another order move the clip factor and the trust ratios by about
/// 1e-7 relative, which shows as an ulp or two of the tensor's scale (and as large relative
/// errors of values that cancel to nearly 0, which an element-wise relative test would flag).
fn max_rel(a: &[Vec<f32>], b: &[Vec<f32>], floor: f32) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0f32;
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.len(), y.len());
        let scale = y.iter().fold(floor, |m, v| m.max(v.abs()));
        for (p, q) in x.iter().zip(y) {
            worst = worst.max((p - q).abs() / scale);
        }
    }
    worst
}

fn values(groups: &[ParamGroup]) -> Vec<Vec<f32>> {
    vars(groups).iter().map(|v| host(v.as_tensor())).collect()
}

fn names(groups: &[ParamGroup]) -> Vec<String> {
    groups
        .iter()
        .flat_map(|g| &g.params)
        .map(|p| p.name.clone())
        .collect()
}

fn state_map(state: Vec<(String, Tensor)>) -> HashMap<String, Tensor> {
    state.into_iter().collect()
}

fn compare_states(cuda: &dyn TrainOptimizer, cpu: &dyn TrainOptimizer, tol: f32) {
    let a = cuda.state_tensors();
    let b = cpu.state_tensors();
    let ka: Vec<_> = a
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect();
    let kb: Vec<_> = b
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect();
    assert_eq!(ka, kb, "state keys and shapes");
    for ((k, x), (_, y)) in a.iter().zip(&b).skip(1) {
        let r = max_rel(&[host(x)], &[host(y)], 1e-12);
        assert!(r < tol, "{k}: relative difference {r}");
    }
    assert_eq!(
        a[0].1.to_scalar::<i64>().unwrap(),
        b[0].1.to_scalar::<i64>().unwrap()
    );
}

fn check_reports(k: u64, a: StepReport, b: StepReport) {
    assert_eq!(a.applied, b.applied, "step {k}: applied");
    assert_eq!(a.step, b.step, "step {k}: step count");
    if b.applied {
        let rel = ((a.grad_norm - b.grad_norm) / b.grad_norm).abs();
        assert!(
            rel < 1e-5,
            "step {k}: grad norm {} vs {}",
            a.grad_norm,
            b.grad_norm
        );
        let rel = ((a.clip_factor - b.clip_factor) / b.clip_factor).abs();
        assert!(
            rel < 1e-5,
            "step {k}: clip {} vs {}",
            a.clip_factor,
            b.clip_factor
        );
    } else {
        assert!(!a.grad_norm.is_finite());
    }
}

/// Steps: 0, 1 unclipped; 2 clipped and fc.bias without gradient; 3 NaN (skipped); 4, 5 mixed.
const SCALES: [(f32, bool); 6] = [
    (1e-3, false),
    (2e-3, false),
    (0.5, false),
    (1e-3, true),
    (0.05, false),
    (1e-3, false),
];
const LRS: [f64; 6] = [0.01, 0.02, 0.05, 0.05, 0.03, 0.01];

fn run_both(config: LambConfig, wd: f64) {
    let Some(dev) = gpu() else { return };
    let cpu_groups = groups(&Device::Cpu, wd);
    let gpu_groups = groups(&dev, wd);
    let mut cpu = Lamb::new(cpu_groups.clone(), config).unwrap();
    let mut cuda = CudaLamb::new(gpu_groups.clone(), config).unwrap();
    let mut clipped = false;
    for (k, (&(scale, nan), &lr)) in SCALES.iter().zip(&LRS).enumerate() {
        let k = k as u64;
        let before = values(&gpu_groups);
        let rb = cpu.step(&grads(&cpu_groups, k, scale, nan), lr).unwrap();
        let ra = cuda.step(&grads(&gpu_groups, k, scale, nan), lr).unwrap();
        check_reports(k, ra, rb);
        clipped |= rb.clip_factor > 1.0;
        let after = values(&gpu_groups);
        if !rb.applied {
            assert_eq!(before, after, "a skipped step changed the parameters");
        }
        // The parameter without gradients is never touched.
        let unused = names(&gpu_groups)
            .iter()
            .position(|n| n == "unused.weight")
            .unwrap();
        assert_eq!(before[unused], after[unused]);
        let r = max_rel(&after, &values(&cpu_groups), 1e-6);
        assert!(r < 1e-5, "step {k}: parameters differ by {r}");
        compare_states(&cuda, &cpu, 1e-5);
    }
    if config.max_grad_norm.is_some() {
        assert!(clipped, "the test should exercise clipping");
    }
}

#[test]
fn matches_cpu_lamb_default_config() {
    run_both(LambConfig::default(), 0.05);
}

#[test]
fn matches_cpu_lamb_other_configs() {
    run_both(
        LambConfig {
            trust_clip: true,
            always_adapt: true,
            ..LambConfig::default()
        },
        0.02,
    );
    run_both(
        LambConfig {
            max_grad_norm: None,
            bias_correction: false,
            grad_averaging: false,
            betas: (0.8, 0.99),
            eps: 1e-8,
            ..LambConfig::default()
        },
        0.0,
    );
}

/// The training loop queues updates and reads a report only now and then: the same schedule
/// (including the NaN step, whose skip is learnt only when the next update is queued) with no
/// report read in between gives the CPU optimizer's state, step count and last report.
#[test]
fn queued_updates_match_stepwise_ones() {
    let Some(dev) = gpu() else { return };
    let config = LambConfig::default();
    let cpu_groups = groups(&Device::Cpu, 0.05);
    let gpu_groups = groups(&dev, 0.05);
    let mut cpu = Lamb::new(cpu_groups.clone(), config).unwrap();
    let mut cuda = CudaLamb::new(gpu_groups.clone(), config).unwrap();
    assert_eq!(
        cuda.last_report().unwrap(),
        None,
        "no report before an update"
    );
    let mut last_cpu = None;
    for (k, (&(scale, nan), &lr)) in SCALES.iter().zip(&LRS).enumerate() {
        let k = k as u64;
        last_cpu = Some(cpu.step(&grads(&cpu_groups, k, scale, nan), lr).unwrap());
        cuda.queue_step(&grads(&gpu_groups, k, scale, nan), lr)
            .unwrap();
    }
    let last = cuda.last_report().unwrap().expect("a report");
    check_reports(SCALES.len() as u64 - 1, last, last_cpu.unwrap());
    assert_eq!(
        cuda.num_steps(),
        cpu.num_steps(),
        "the skipped step is not counted"
    );
    assert_eq!(cuda.num_steps(), SCALES.len() as u64 - 1);
    let r = max_rel(&values(&gpu_groups), &values(&cpu_groups), 1e-6);
    assert!(r < 1e-5, "parameters differ by {r}");
    compare_states(&cuda, &cpu, 1e-5);
}

#[test]
fn is_deterministic() {
    let Some(dev) = gpu() else { return };
    let run = || {
        let g = groups(&dev, 0.05);
        let mut opt = CudaLamb::new(g.clone(), LambConfig::default()).unwrap();
        for k in 0..3 {
            opt.step(&grads(&g, k, 0.3, false), 0.02).unwrap();
        }
        values(&g)
    };
    assert_eq!(run(), run(), "two runs differ");
}

#[test]
fn state_round_trips_between_cpu_and_cuda() {
    let Some(dev) = gpu() else { return };
    let config = LambConfig::default();
    // Two CPU steps, then the state into a CUDA optimizer over the same weights.
    let cpu_groups = groups(&Device::Cpu, 0.05);
    let mut cpu = Lamb::new(cpu_groups.clone(), config).unwrap();
    for k in 0..2 {
        cpu.step(&grads(&cpu_groups, k, 0.01, false), 0.02).unwrap();
    }
    let gpu_groups = groups(&dev, 0.05);
    for (g, c) in vars(&gpu_groups).iter().zip(vars(&cpu_groups)) {
        g.set(&c.as_tensor().to_device(&dev).unwrap()).unwrap();
    }
    let mut cuda = CudaLamb::new(gpu_groups.clone(), config).unwrap();
    let cpu_state = state_map(cpu.state_tensors());
    cuda.load_state(&cpu_state).unwrap();
    assert_eq!(cuda.num_steps(), 2);
    // Loading and saving again is exact.
    for (k, t) in cuda.state_tensors().into_iter().skip(1) {
        assert_eq!(host(&t), host(&cpu_state[&k]), "{k} after load_state");
    }
    // Both continue alike (fc.bias without gradient at step 2, unused.weight without state).
    for k in 2..5 {
        let rb = cpu.step(&grads(&cpu_groups, k, 0.05, false), 0.02).unwrap();
        let ra = cuda
            .step(&grads(&gpu_groups, k, 0.05, false), 0.02)
            .unwrap();
        check_reports(k, ra, rb);
        let r = max_rel(&values(&gpu_groups), &values(&cpu_groups), 1e-6);
        assert!(r < 1e-5, "step {k} after resume: {r}");
    }
    // And the CUDA state loads into a CPU optimizer.
    let mut cpu2 = Lamb::new(groups(&Device::Cpu, 0.05), config).unwrap();
    cpu2.load_state(&state_map(cuda.state_tensors())).unwrap();
    assert_eq!(cpu2.num_steps(), cuda.num_steps());
    compare_states(&cuda, &cpu2, 1e-30);

    // A snapshot is not altered by later steps.
    let snap = cuda.state_tensors();
    let before: Vec<Vec<f32>> = snap.iter().skip(1).map(|(_, t)| host(t)).collect();
    cuda.step(&grads(&gpu_groups, 9, 0.05, false), 0.02)
        .unwrap();
    let again: Vec<Vec<f32>> = snap.iter().skip(1).map(|(_, t)| host(t)).collect();
    assert_eq!(before, again);

    // Bad states are refused and leave the optimizer as it was.
    let mut bad = state_map(cuda.state_tensors());
    bad.insert(
        "exp_avg.nope".to_string(),
        Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(cuda.load_state(&bad).is_err());
    let mut bad = state_map(cuda.state_tensors());
    bad.insert(
        "exp_avg.fc.weight".to_string(),
        Tensor::zeros((3, 3), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(cuda.load_state(&bad).is_err());
    let mut bad = state_map(cuda.state_tensors());
    bad.remove("exp_avg_sq.fc.weight");
    assert!(cuda.load_state(&bad).is_err());
    assert_eq!(cuda.num_steps(), 6);
}

#[test]
fn rejects_bad_parameters() {
    let Some(dev) = gpu() else { return };
    let cpu = groups(&Device::Cpu, 0.05);
    assert!(CudaLamb::new(cpu, LambConfig::default()).is_err());
    let mut g = groups(&dev, 0.05);
    let dup = g[0].params[0].clone();
    g[1].params.push(dup);
    assert!(CudaLamb::new(g, LambConfig::default()).is_err());
    let bf = Var::from_tensor(&Tensor::zeros(4, candle_core::DType::BF16, &dev).unwrap()).unwrap();
    let g = vec![ParamGroup {
        weight_decay: 0.0,
        lr_scale: 1.0,
        params: vec![NamedVar {
            name: "x".into(),
            var: bf,
        }],
    }];
    assert!(CudaLamb::new(g, LambConfig::default()).is_err());
}

/// The optimizer step over ResNet-50's parameters (161 tensors, 25.6 M values) with random
/// gradients: `CudaLamb` and, for reference, the generic `Lamb` on the same GPU. Run with
/// `cargo test --release --features cuda -p trainer --test cuda_lamb -- --ignored --nocapture`.
#[test]
#[ignore = "timing; run on a GPU by hand"]
fn resnet50_step_time() {
    use trainer::model::ResNetConfig;
    let Some(dev) = gpu() else { return };
    let time = |opt: &mut dyn TrainOptimizer, grads: &GradStore, steps: usize| {
        for _ in 0..3 {
            opt.step(grads, 1e-3).unwrap();
        }
        dev.synchronize().unwrap();
        let t0 = std::time::Instant::now();
        for _ in 0..steps {
            let r = opt.step(grads, 1e-3).unwrap();
            assert!(r.applied);
        }
        dev.synchronize().unwrap();
        t0.elapsed().as_secs_f64() * 1e3 / steps as f64
    };
    let build = || {
        let varmap = candle_nn::VarMap::new();
        let model = ResNetConfig::by_name("resnet50")
            .unwrap()
            .build_seeded(&varmap, 0, candle_core::DType::F32, &dev)
            .unwrap();
        let vars = model.trainable_vars().unwrap();
        let groups = trainer::optim::param_groups(vars, 0.02);
        let mut grads = GradStore::default();
        for p in groups.iter().flat_map(|g| &g.params) {
            let w = p.var.as_tensor();
            grads.insert(w, (w.randn_like(0.0, 1.0).unwrap() * 1e-4).unwrap());
        }
        (groups, grads)
    };
    let (groups, grads) = build();
    let num_tensors: usize = groups.iter().map(|g| g.params.len()).sum();
    let numel: usize = groups
        .iter()
        .flat_map(|g| &g.params)
        .map(|p| p.var.elem_count())
        .sum();
    let mut cuda = CudaLamb::new(groups, LambConfig::default()).unwrap();
    let chunks = cuda.num_chunks();
    let ms_cuda = time(&mut cuda, &grads, 50);
    let (groups, grads) = build();
    let mut generic = Lamb::new(groups, LambConfig::default()).unwrap();
    let ms_generic = time(&mut generic, &grads, 10);
    println!(
        "{{\"bench\":\"lamb_step\",\"tensors\":{num_tensors},\"numel\":{numel},\"chunks\":{chunks},\
         \"cuda_lamb_ms\":{ms_cuda:.3},\"generic_lamb_on_gpu_ms\":{ms_generic:.3}}}"
    );
}
