//! The CUDA LAMB kernels run on the CPU (`lamb_emu/run.sh`: their source compiled as C++, see
//! `lamb_emu/shim.h`) against the CPU `Lamb`: a check of the kernels' maths that needs no GPU.
//! Without `LAMB_EMU_DIR` (the output of `run.sh`) the test prints a message and passes.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use trainer::optim::{Lamb, LambConfig, NamedVar, ParamGroup, TrainOptimizer};

/// Flat order of the harness: group 0 (weight decay), then group 1.
const PARAMS: [(&str, &[usize]); 7] = [
    ("conv.weight", &[32, 16, 3, 3]),
    ("fc.weight", &[100, 400]),
    ("exact.weight", &[256, 64]),
    ("unused.weight", &[7, 5]),
    ("bn.weight", &[32]),
    ("bn.bias", &[32]),
    ("fc.bias", &[100]),
];
const LRS: [f64; 6] = [0.01, 0.02, 0.05, 0.05, 0.03, 0.01];

fn read_f32(path: &str) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    bytes
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn read_f64(path: &str) -> Vec<f64> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    bytes
        .chunks(8)
        .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn host(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Largest |a - b| relative to the largest |b|, and how many values are not bit-equal.
fn compare(a: &[f32], b: &[f32]) -> (f32, usize) {
    let scale = b.iter().fold(1e-30f32, |m, v| m.max(v.abs()));
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / scale)
        .fold(0f32, f32::max);
    let differ = a
        .iter()
        .zip(b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count();
    (worst, differ)
}

fn config(cfg: usize) -> (LambConfig, f64) {
    match cfg {
        0 => (LambConfig::default(), 0.05),
        1 => (
            LambConfig {
                trust_clip: true,
                always_adapt: true,
                ..LambConfig::default()
            },
            0.02,
        ),
        _ => (
            LambConfig {
                max_grad_norm: None,
                bias_correction: false,
                grad_averaging: false,
                betas: (0.8, 0.99),
                eps: 1e-8,
                ..LambConfig::default()
            },
            0.0,
        ),
    }
}

fn run(dir: &str, cfg: usize) {
    let dir = format!("{dir}/cfg{cfg}");
    let (config, wd) = config(cfg);
    let init = read_f32(&format!("{dir}/params_init.bin"));
    let mut groups = vec![
        ParamGroup {
            weight_decay: wd,
            params: vec![],
        },
        ParamGroup {
            weight_decay: 0.0,
            params: vec![],
        },
    ];
    let mut vars = Vec::new();
    let mut ranges = Vec::new();
    let mut offset = 0;
    for (i, (name, shape)) in PARAMS.iter().enumerate() {
        let n: usize = shape.iter().product();
        let t = Tensor::from_vec(init[offset..offset + n].to_vec(), *shape, &Device::Cpu).unwrap();
        let var = Var::from_tensor(&t).unwrap();
        groups[usize::from(i >= 4)].params.push(NamedVar {
            name: name.to_string(),
            var: var.clone(),
        });
        vars.push(var);
        ranges.push(offset..offset + n);
        offset += n;
    }
    let mut opt = Lamb::new(groups, config).unwrap();
    for (k, &lr) in LRS.iter().enumerate() {
        let g = read_f32(&format!("{dir}/grads_{k}.bin"));
        let mask = std::fs::read(format!("{dir}/mask_{k}.bin")).unwrap();
        let mut grads = GradStore::default();
        for (i, (_, shape)) in PARAMS.iter().enumerate() {
            if mask[i] != 0 {
                let gi = g[ranges[i].clone()].to_vec();
                let gi = Tensor::from_vec(gi, *shape, &Device::Cpu).unwrap();
                grads.insert(vars[i].as_tensor(), gi);
            }
        }
        let r = opt.step(&grads, lr).unwrap();
        let emu = read_f64(&format!("{dir}/report_{k}.bin"));
        assert_eq!(r.applied, emu[2] == 0.0, "cfg {cfg} step {k}: applied");
        assert_eq!(r.step as f64, emu[3], "cfg {cfg} step {k}: step count");
        if r.applied {
            let rel = ((r.grad_norm - emu[0]) / r.grad_norm).abs();
            assert!(
                rel < 1e-6,
                "cfg {cfg} step {k}: grad norm {} vs {}",
                r.grad_norm,
                emu[0]
            );
        }
        let state: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
        let params = read_f32(&format!("{dir}/params_{k}.bin"));
        let moments = [
            ("exp_avg", read_f32(&format!("{dir}/exp_avg_{k}.bin"))),
            ("exp_avg_sq", read_f32(&format!("{dir}/exp_avg_sq_{k}.bin"))),
        ];
        let (mut worst, mut differ) = (0f32, 0);
        for (i, (name, _)) in PARAMS.iter().enumerate() {
            let mut pairs = vec![(&params[ranges[i].clone()], host(vars[i].as_tensor()))];
            for (key, emu) in &moments {
                if let Some(t) = state.get(&format!("{key}.{name}")) {
                    pairs.push((&emu[ranges[i].clone()], host(t)));
                }
            }
            for (a, b) in pairs {
                let (w, d) = compare(a, &b);
                worst = worst.max(w);
                differ += d;
            }
        }
        println!(
            "cfg {cfg} step {k}: applied {}, clip {:.9} (emulated {:.9}), {differ} values not \
             bit-equal, largest difference {worst:.2e} of the tensor's scale",
            r.applied, r.clip_factor, emu[1]
        );
        assert!(worst < 1e-6, "cfg {cfg} step {k}: {worst}");
    }
}

#[test]
fn emulated_cuda_kernels_match_cpu_lamb() {
    let Ok(dir) = std::env::var("LAMB_EMU_DIR") else {
        println!("SKIPPED: set LAMB_EMU_DIR (bash trainer/tests/lamb_emu/run.sh does)");
        return;
    };
    for cfg in 0..3 {
        run(&dir, cfg);
    }
}
