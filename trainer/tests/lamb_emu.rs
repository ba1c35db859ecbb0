//! The CUDA LAMB kernels of `trainer/src/cuda/lamb.rs` run on the CPU against the CPU `Lamb`: a
//! check of the kernels' maths that needs no GPU and no CUDA toolkit, only `g++` (C++17,
//! ucontext).
//!
//! How: the test reads the kernel source (`MODULE`) and `PRELUDE` out of the `.rs` files, writes
//! them as `kernels.cu` to a temporary directory, compiles them as C++ with `lamb_emu/shim.h`
//! (the fiber shim of `kernel_emu/shim.h`: blocks one after another, the threads of a block as
//! fibers on one OS thread that switch at `__syncthreads`, plus the `_rn` intrinsics as plain
//! IEEE operations, `-ffp-contract=off`) and `lamb_emu/harness.cpp` (the host side of
//! `CudaLamb::step` over the case of `cuda_lamb.rs`), runs the harness for configurations 0, 1
//! and 2, each in a directory of its own, and replays every step with the CPU `Lamb`. Without
//! `g++` (or with one too old for C++17) the test prints `skipped: ...` and passes.
//!
//! Checked per step: applied or skipped (a NaN gradient at step 3), the step count, the global
//! gradient norm (1e-6 relative), and parameters and moments within 1e-6 of each tensor's largest
//! magnitude, bit-equal in configuration 2 (no clipping, no trust ratio); the printout
//! (`--nocapture`) gives how many values are not bit-equal and the largest difference.

mod emu;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use trainer::optim::{Lamb, LambConfig, NamedVar, ParamGroup, TrainOptimizer};

/// Flat order of the harness: group 0 (weight decay), then group 1 (learning-rate factor 0.25).
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

fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn read_f64(path: &Path) -> Vec<f64> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
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

/// Replays configuration `cfg` with the CPU `Lamb` and compares it with the harness's outputs in
/// `dir`.
fn check(dir: &Path, cfg: usize) {
    let (config, wd) = config(cfg);
    let init = read_f32(&dir.join("params_init.bin"));
    let mut groups = vec![
        ParamGroup {
            weight_decay: wd,
            lr_scale: 1.0,
            params: vec![],
        },
        ParamGroup {
            weight_decay: 0.0,
            lr_scale: 0.25, // as the harness: this group steps at a quarter of the rate
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
        let g = read_f32(&dir.join(format!("grads_{k}.bin")));
        let mask = std::fs::read(dir.join(format!("mask_{k}.bin"))).unwrap();
        let mut grads = GradStore::default();
        for (i, (_, shape)) in PARAMS.iter().enumerate() {
            if mask[i] != 0 {
                let gi = g[ranges[i].clone()].to_vec();
                let gi = Tensor::from_vec(gi, *shape, &Device::Cpu).unwrap();
                grads.insert(vars[i].as_tensor(), gi);
            }
        }
        let r = opt.step(&grads, lr).unwrap();
        let emu = read_f64(&dir.join(format!("report_{k}.bin")));
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
        let params = read_f32(&dir.join(format!("params_{k}.bin")));
        let moments = [
            ("exp_avg", read_f32(&dir.join(format!("exp_avg_{k}.bin")))),
            (
                "exp_avg_sq",
                read_f32(&dir.join(format!("exp_avg_sq_{k}.bin"))),
            ),
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
        // Without clipping and trust ratios (cfg 2) the element-wise maths is the CPU's operation
        // by operation: bit-identical (src/cuda/lamb.rs).
        assert!(
            cfg != 2 || differ == 0,
            "cfg {cfg} step {k}: {differ} values not bit-equal"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Sources, build, runs.

/// Builds the harness in `dir` around PRELUDE + the LAMB module's source; `Err` (with the
/// reason) when no usable g++ is installed.
fn build_harness(dir: &Path) -> Result<PathBuf, String> {
    emu::gxx_usable(dir)?;
    let source = format!(
        "{}\n// ---- src/cuda/lamb.rs\n{}",
        emu::prelude(),
        emu::module_source("src/cuda/lamb.rs")
    );
    std::fs::write(dir.join("kernels.cu"), source).unwrap();
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lamb_emu");
    Ok(emu::compile(
        dir,
        &here.join("harness.cpp"),
        &[&here, dir],
        "the LAMB kernels",
    ))
}

/// Runs the harness for configuration `cfg` in `root/cfg{cfg}`; returns that directory.
fn run_harness(exe: &Path, root: &Path, cfg: usize) -> PathBuf {
    let dir = root.join(format!("cfg{cfg}"));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(exe)
        .arg(cfg.to_string())
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "harness {cfg} failed ({}) in {}:\n{}",
        out.status,
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

#[test]
fn emulated_cuda_kernels_match_cpu_lamb() {
    let start = std::time::Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let exe = match build_harness(root) {
        Ok(exe) => exe,
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
    };
    println!("harness built in {:.1} s", start.elapsed().as_secs_f32());
    for cfg in 0..3 {
        let t = std::time::Instant::now();
        let dir = run_harness(&exe, root, cfg);
        let emulated = t.elapsed().as_secs_f32();
        check(&dir, cfg);
        println!(
            "cfg {cfg}: emulated in {emulated:.2} s, checked in {:.2} s",
            t.elapsed().as_secs_f32() - emulated
        );
    }
}
