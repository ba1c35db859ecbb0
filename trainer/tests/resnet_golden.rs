//! Parity of the candle ResNets with timm 0.5.4.
//!
//! The JSON files under `tests/golden/` come from `tests/golden/resnet_golden.py` (timm 0.5.4,
//! torch 2.5.1 CPU, float32); CI only reads them. The script fills every tensor with
//! `hashed(name, shape)`, reproduced here bit for bit:
//!
//! ```python
//! def hashed(name, n):  # element i of tensor `name`, in [-1, 1)
//!     z = fnv1a64(name) + (i + 1) * 0x9E3779B97F4A7C15            # mod 2^64
//!     z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
//!     z = (z ^ (z >> 27)) * 0x94D049BB133111EB
//!     z = z ^ (z >> 31)
//!     return 2 * ((z >> 11) * 2**-53) - 1
//! # running_mean 0.1*s; running_var 1 + 0.25*(s + 1); conv weight s*sqrt(6/fan_in);
//! # fc weight s/sqrt(in); BN gamma 1 + 0.2*s; every bias 0.1*s
//! ```
//!
//! then runs an eval forward, a train forward (batch statistics, no drop path) and the backward
//! of `sum(train_logits * coef)` on a `2x3x64x64` input.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde_json::Value;
use trainer::model::drop_path::drop_path_scales;
use trainer::model::{is_running_stat, model_names, NetConfig, ResNet, ResNetConfig};

fn json(text: &str) -> Value {
    serde_json::from_str(text).expect("golden JSON parses")
}

fn fnv1a64(name: &str) -> u64 {
    trainer::model::params::name_hash(name)
}

fn hashed(name: &str, n: usize) -> Vec<f64> {
    let h = fnv1a64(name);
    (1..=n as u64)
        .map(|i| {
            let mut z = h.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            2.0 * ((z >> 11) as f64 * (1.0 / (1u64 << 53) as f64)) - 1.0
        })
        .collect()
}

/// `golden_value` of the Python script.
fn golden_value(name: &str, shape: &[usize]) -> Vec<f32> {
    let s = hashed(name, shape.iter().product());
    let last = name.rsplit('.').next().unwrap();
    let f: Box<dyn Fn(f64) -> f64> = match (last, shape.len()) {
        ("running_mean", _) => Box::new(|s| 0.1 * s),
        ("running_var", _) => Box::new(|s| 1.0 + 0.25 * (s + 1.0)),
        ("weight", 4) => {
            let k = (6.0 / (shape[1] * shape[2] * shape[3]) as f64).sqrt();
            Box::new(move |s| s * k)
        }
        ("weight", 3) => {
            let k = (6.0 / (shape[1] * shape[2]) as f64).sqrt();
            Box::new(move |s| s * k)
        }
        ("weight", 2) => {
            let k = (shape[1] as f64).sqrt();
            Box::new(move |s| s / k)
        }
        ("weight", _) => Box::new(|s| 1.0 + 0.2 * s),
        _ => Box::new(|s| 0.1 * s),
    };
    s.into_iter().map(|v| f(v) as f32).collect()
}

fn tensor_of(name: &str, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(golden_value(name, shape), shape, &Device::Cpu)
}

/// `|got - want| <= tol`, reporting the largest difference.
fn max_abs_diff(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}

fn flat(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(a) => a.iter().flat_map(flat).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap()],
        other => panic!("not a number: {other}"),
    }
}

#[test]
fn names_and_shapes_equal_timm_state_dict() -> Result<()> {
    let golden = json(include_str!("golden/resnet_keys.json"));
    let models = golden["models"].as_object().unwrap();
    assert_eq!(
        models.keys().collect::<std::collections::BTreeSet<_>>(),
        model_names()
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .iter()
            .collect()
    );
    for (name, keys) in models {
        let want: Vec<(String, Vec<usize>)> = keys
            .as_array()
            .unwrap()
            .iter()
            .map(|kv| {
                let shape = kv[1]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize);
                (kv[0].as_str().unwrap().to_string(), shape.collect())
            })
            .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
            .collect();
        let cfg = NetConfig::by_name(name).unwrap();
        // Zero tensors are calloc'd, so even ResNet-152 builds in milliseconds.
        let model = cfg.build(VarBuilder::zeros(DType::F32, &Device::Cpu))?;
        let got: Vec<(String, Vec<usize>)> = model
            .params()
            .iter()
            .map(|p| (p.name.clone(), p.tensor.dims().to_vec()))
            .collect();
        assert_eq!(got.len(), want.len(), "{name}: tensor count");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g, w, "{name}: state_dict order and shapes");
        }
        for p in model.params() {
            assert_eq!(
                p.kind.is_trainable(),
                !is_running_stat(&p.name),
                "{}",
                p.name
            );
        }
    }
    Ok(())
}

#[test]
fn drop_path_schedule_equals_timm() {
    let golden = json(include_str!("golden/resnet_drop_path.json"));
    let rate = golden["drop_path_rate"].as_f64().unwrap();
    for (name, probs) in golden["models"].as_object().unwrap() {
        let cfg = ResNetConfig::by_name(name)
            .unwrap()
            .with_drop_path_rate(rate);
        let want: Vec<f64> = flat(probs);
        // Same f64 expression as timm, but serde_json's default float parser may be off by an
        // ulp (no `float_roundtrip` feature), so compare to 1e-15.
        let got = cfg.block_drop_probs();
        assert_eq!(got.len(), want.len(), "{name}");
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-15, "{name}: {g} vs {w}");
        }
    }
}

/// `cfg` with every tensor set to the script's `golden_value`, rounded to f32, in `dtype`.
fn golden_model(cfg: &NetConfig, dtype: DType) -> Result<ResNet> {
    let varmap = VarMap::new();
    let model = cfg.build(VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu))?;
    for p in model.params() {
        p.var()?
            .set(&tensor_of(&p.name, p.tensor.dims())?.to_dtype(dtype)?)?;
    }
    Ok(model)
}

/// The raw `hashed` values (input, loss coefficients), rounded to f32, in `dtype`.
fn raw(name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let v: Vec<f32> = hashed(name, shape.iter().product())
        .into_iter()
        .map(|v| v as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)
}

/// timm's seresnet50 at drop_path_rate 0.5, in float64 train mode, with each `DropPath` replaced
/// by one that applies this crate's mask (`loader::rng` ported to the script): equal logits show
/// that the drop-path sits where timm's does (after SE, before the shortcut add) and scales by
/// `1 / keep`, and that the masks are the documented function of `(seed, block index)`.
#[test]
fn seeded_drop_path_forward_equals_timm_with_the_same_masks() -> Result<()> {
    let golden = json(include_str!("golden/resnet_drop_path.json"));
    let g = &golden["seeded_forward"];
    let fw = json(include_str!("golden/resnet_forward.json"));
    let num_classes = fw["num_classes"].as_u64().unwrap() as usize;
    let in_shape: Vec<usize> = flat(&fw["input_shape"])
        .iter()
        .map(|&d| d as usize)
        .collect();
    let rate = g["drop_path_rate"].as_f64().unwrap();
    let seed = g["seed"].as_u64().unwrap();
    let cfg = ResNetConfig::by_name(g["model"].as_str().unwrap())
        .unwrap()
        .with_num_classes(num_classes)
        .with_drop_path_rate(rate);

    // The masks themselves: keep flags per block (null for the first block, rate 0).
    let probs = cfg.block_drop_probs();
    for (k, flags) in g["keep_flags"].as_array().unwrap().iter().enumerate() {
        let Some(flags) = flags.as_array() else {
            assert_eq!(probs[k], 0.0);
            continue;
        };
        let got: Vec<bool> = drop_path_scales(flags.len(), probs[k], seed, k)
            .iter()
            .map(|&s| s > 0.0)
            .collect();
        let want: Vec<bool> = flags.iter().map(|f| f.as_bool().unwrap()).collect();
        assert_eq!(got, want, "block {k}");
    }

    let model = golden_model(&cfg.into(), DType::F64)?;
    let xs = raw("input", &in_shape, DType::F64)?;
    let logits = flat_t(&model.forward_train(&xs, seed)?)?;
    let diff = max_abs_diff(&logits, &flat(&g["train_logits_f64"]));
    println!("seeded drop-path forward, f64: max|d logits| {diff:.2e}");
    assert!(diff < 1e-9, "logits differ by {diff}");
    Ok(())
}

struct Parity {
    eval_logits: f64,
    train_logits: f64,
    grad_rel: f64,
    stats: f64,
}

/// `floor_rel`: gradient norms below this fraction of the network's largest are compared
/// against that floor instead of themselves (see [`check_with`]).
fn parity(name: &str, dtype: DType, floor_rel: f64) -> Result<Parity> {
    let golden = json(include_str!("golden/resnet_forward.json"));
    let g = &golden["models"][name][if dtype == DType::F64 { "f64" } else { "f32" }];
    let num_classes = golden["num_classes"].as_u64().unwrap() as usize;
    let in_shape: Vec<usize> = flat(&golden["input_shape"])
        .iter()
        .map(|&d| d as usize)
        .collect();

    let cfg = golden_config(name).with_num_classes(num_classes);
    let model = golden_model(&cfg, dtype)?;
    // The input and the loss coefficients are the raw `hashed` values.
    let xs = raw("input", &in_shape, dtype)?;
    let coef = raw("loss_coef", &[2, num_classes], dtype)?;

    let eval = model.forward_eval(&xs)?;
    let eval_diff = max_abs_diff(&flat_t(&eval)?, &flat(&g["eval_logits"]));

    let train = model.forward_train(&xs, 0)?;
    let train_diff = max_abs_diff(&flat_t(&train)?, &flat(&g["train_logits"]));
    let grads = (train * coef)?.sum_all()?.backward()?;
    let mut grad_rel: f64 = 0.0;
    let want_norms = g["grad_norms"].as_object().unwrap();
    let largest = want_norms
        .values()
        .map(|v| v.as_f64().unwrap())
        .fold(0.0, f64::max);
    let grad_floor = (floor_rel * largest).max(1e-6);
    let trainable = model.trainable_vars()?;
    assert_eq!(
        trainable.len(),
        want_norms.len(),
        "{name}: trainable tensor count"
    );
    for (pname, var) in &trainable {
        let want = want_norms[pname].as_f64().unwrap();
        let got = grads
            .get(var.as_tensor())
            .map(|t| {
                t.to_dtype(DType::F64)?
                    .sqr()?
                    .sum_all()?
                    .sqrt()?
                    .to_scalar::<f64>()
            })
            .transpose()?
            .unwrap_or(0.0);
        grad_rel = grad_rel.max((got - want).abs() / want.max(grad_floor));
    }
    let mut stats = 0f64;
    for (sname, want) in g["running_stats"].as_object().unwrap() {
        let (_, t) = model
            .running_stats()
            .into_iter()
            .find(|(n, _)| n == sname)
            .unwrap_or_else(|| panic!("{sname} missing"));
        let got = flat_t(&t)?;
        let want = flat(want);
        stats = stats.max(max_abs_diff(&got[..want.len()], &want));
    }
    Ok(Parity {
        eval_logits: eval_diff,
        train_logits: train_diff,
        grad_rel,
        stats,
    })
}

/// The network of a golden entry: a timm name, or `NAME@1111`, NAME with one block per stage
/// (the script builds timm's ResNet from NAME's arguments with `layers=[1, 1, 1, 1]`).
fn golden_config(name: &str) -> NetConfig {
    match name.strip_suffix("@1111") {
        Some(base) => ResNetConfig {
            layers: [1, 1, 1, 1],
            ..ResNetConfig::by_name(base).unwrap()
        }
        .into(),
        None => NetConfig::by_name(name).unwrap(),
    }
}

fn flat_t(t: &Tensor) -> Result<Vec<f64>> {
    t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()
}

/// Compares one model in float64 (a tight check: the same math must agree to rounding) and in
/// float32, the training dtype.
///
/// Tolerances. float64: 1e-9 on logits and running statistics and 1e-7 relative on gradient
/// norms, so any semantic difference shows. float32: both sides sum in different orders
/// (candle's im2col GEMM vs torch's oneDNN), and these random-weight networks are badly
/// conditioned in train mode (gradient norms up to ~5e3 for a loss of ~1, through up to 17
/// train-mode BNs that divide by small batch standard deviations), so rounding is amplified:
/// torch float32 itself differs from torch float64 by 1e-4 on train logits and 3.4e-3 relative
/// on gradient norms for resnet50d. The float32 bounds are 1e-3 absolute on logits (of
/// magnitude up to ~20 in eval), 1e-4 on running statistics and 5e-2 relative on gradient norms.
fn check(name: &str) -> Result<()> {
    check_with(name, 0.0)
}

/// [`check`], with float32 gradient norms smaller than `f32_floor_rel` times the network's
/// largest compared against that floor. EfficientNet needs it: the bias of each block's last BN
/// (a per-channel shift, with no activation after the residual add) reaches the loss only
/// through later train-mode BatchNorms, which remove exactly such shifts, so its gradient is zero
/// in exact arithmetic (torch float64: 4e-16; ours agrees), and in float32 both sides return
/// rounding noise of up to about 1.2e-7 of the largest norm (59 for B0). Float64 keeps the plain
/// check.
fn check_with(name: &str, f32_floor_rel: f64) -> Result<()> {
    check_with_bounds(name, f32_floor_rel, 1e-3, 1e-4)
}

/// [`check_with`] with other float32 bounds on logits and running statistics, for a network
/// whose float32 rounding exceeds the default ones in torch itself (see the test that uses it).
fn check_with_bounds(
    name: &str,
    f32_floor_rel: f64,
    f32_logits_tol: f64,
    f32_stats_tol: f64,
) -> Result<()> {
    for (dtype, logits_tol, stats_tol, grad_tol, floor_rel) in [
        (DType::F64, 1e-9, 1e-9, 1e-7, 0.0),
        (
            DType::F32,
            f32_logits_tol,
            f32_stats_tol,
            5e-2,
            f32_floor_rel,
        ),
    ] {
        let p = parity(name, dtype, floor_rel)?;
        println!(
            "{name} {dtype:?}: max|d eval logits| {:.2e}, max|d train logits| {:.2e}, max rel d grad norm {:.2e}, max|d running stats| {:.2e}",
            p.eval_logits, p.train_logits, p.grad_rel, p.stats
        );
        assert!(
            p.eval_logits < logits_tol,
            "{name} {dtype:?}: eval logits differ by {}",
            p.eval_logits
        );
        assert!(
            p.train_logits < logits_tol,
            "{name} {dtype:?}: train logits differ by {}",
            p.train_logits
        );
        assert!(
            p.grad_rel < grad_tol,
            "{name} {dtype:?}: gradient norms differ by {} (relative)",
            p.grad_rel
        );
        assert!(
            p.stats < stats_tol,
            "{name} {dtype:?}: running stats differ by {}",
            p.stats
        );
    }
    Ok(())
}

#[test]
fn resnet18_matches_timm() -> Result<()> {
    check("resnet18")
}

#[test]
fn resnet50_matches_timm() -> Result<()> {
    check("resnet50")
}

#[test]
fn resnet50d_matches_timm() -> Result<()> {
    check("resnet50d")
}

#[test]
fn seresnet50_matches_timm() -> Result<()> {
    check("seresnet50")
}

#[test]
fn resnext50_32x4d_matches_timm() -> Result<()> {
    check("resnext50_32x4d")
}

/// Tiered deep stem, pooled shortcuts and ECA (its 1-D conv across channels).
#[test]
fn ecaresnet50t_matches_timm() -> Result<()> {
    check("ecaresnet50t")
}

/// ECA-ResNet-269-D's blocks (deep stem, ECA) at one block per stage.
#[test]
fn ecaresnet269d_blocks_match_timm() -> Result<()> {
    check("ecaresnet269d@1111")
}

/// RegNetY-200MF: the RegNet stem (3x3/2, no max-pool), grouped bottlenecks of group width 8,
/// squeeze-excitation after the 3x3 at a quarter of the block's input width, 1x1 strided
/// shortcuts, `head.fc` with timm's init.
#[test]
fn regnety_002_matches_timm() -> Result<()> {
    check("regnety_002")
}

/// RegNetY-4GF (Table 3).
#[test]
fn regnety_040_matches_timm() -> Result<()> {
    check("regnety_040")
}

/// EfficientNet-B0: SiLU, depthwise convs (3x3 and 5x5), inverted residuals with SE after the
/// depthwise conv, residual adds without activation, `conv_head`, `classifier`.
#[test]
fn efficientnet_b0_matches_timm() -> Result<()> {
    check_with("efficientnet_b0", 1e-5)
}

/// EfficientNet-B2: the channel (1.1) and depth (1.2) multipliers.
#[test]
fn efficientnet_b2_matches_timm() -> Result<()> {
    check_with("efficientnet_b2", 1e-5)
}

/// EfficientNetV2-rw-S: edge residuals (Fused-MBConv, a full 3x3 expansion conv) in the first
/// three stages, inverted residuals after. Float64 as every network; float32 within 3e-3 on
/// logits and 1e-3 on running statistics: 40 train-mode BatchNorms deep, torch's own float32
/// differs from its float64 by 1.3e-3 on the eval logits (of magnitude ~40) and 1.9e-4 on the
/// statistics, beyond the default bounds (observed here: 9.7e-4 and 6.4e-4).
#[test]
fn efficientnetv2_rw_s_matches_timm() -> Result<()> {
    check_with_bounds("efficientnetv2_rw_s", 1e-5, 3e-3, 1e-3)
}

/// SENet-154's blocks at one block per stage: 64 groups, the first conv at half width
/// (`block_reduce_first = 2`), 3x3 strided shortcuts, squeeze-excite, a 64-wide deep stem.
#[test]
fn senet154_blocks_match_timm() -> Result<()> {
    check("senet154@1111")
}

/// `golden/weights_*.gz`: timm's ResNet (BasicBlock, one block per stage, 10 classes) saved by
/// torch 2.5.1 as a bare `.pth` state_dict, as a `.pth` dict with the state_dict under
/// `state_dict` and every key prefixed `module.`, as `{"model": float16 state_dict}`, and as
/// safetensors (`golden/weights_golden.py`). Each file, gunzipped, loads into the candle ResNet by
/// timm's names and gives timm's eval logits on the script's input. Tolerance 1e-4 absolute on
/// logits of magnitude below 1 (float32 in both; the float16 file against timm's forward with
/// the same float16 weights widened to float32).
#[test]
fn timm_weight_files_load_and_give_timm_logits() -> Result<()> {
    use std::io::Read;
    use trainer::model::ActivationLayout;
    let golden = json(include_str!("golden/weights_logits.json"));
    let num_classes = golden["num_classes"].as_u64().unwrap() as usize;
    let in_shape: Vec<usize> = flat(&golden["input_shape"])
        .iter()
        .map(|&d| d as usize)
        .collect();
    let cfg = ResNetConfig {
        layers: [1, 1, 1, 1],
        ..ResNetConfig::by_name("resnet18")
            .unwrap()
            .with_num_classes(num_classes)
    };
    let x = raw("input", &in_shape, DType::F32)?;
    let dir = tempfile::tempdir().unwrap();
    let files: [(&str, &[u8], &str); 4] = [
        (
            "weights_resnet10.pth",
            include_bytes!("golden/weights_resnet10.pth.gz"),
            "logits",
        ),
        (
            "weights_resnet10_wrapped.pth",
            include_bytes!("golden/weights_resnet10_wrapped.pth.gz"),
            "logits",
        ),
        (
            "weights_resnet10_f16.pth",
            include_bytes!("golden/weights_resnet10_f16.pth.gz"),
            "logits_f16_weights",
        ),
        (
            "weights_resnet10.safetensors",
            include_bytes!("golden/weights_resnet10.safetensors.gz"),
            "logits",
        ),
    ];
    for (name, gz, logits_key) in files {
        let mut bytes = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut bytes)
            .unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        let want = flat(&golden[logits_key]);
        for layout in [ActivationLayout::Nchw, ActivationLayout::Nhwc] {
            let varmap = VarMap::new();
            let mut model =
                cfg.build(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
            model.set_layout(layout);
            trainer::checkpoint::load_weights(&varmap, &path)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let input = match layout {
                ActivationLayout::Nhwc => x.permute((0, 2, 3, 1))?.contiguous()?,
                _ => x.clone(),
            };
            let got: Vec<f64> = model
                .forward_eval(&input)?
                .to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1()?;
            let diff = max_abs_diff(&got, &want);
            assert!(diff < 1e-4, "{name} ({layout:?}): logits differ by {diff}");
        }
    }

    // The loader's errors name the key: a missing tensor, an unexpected one, a wrong shape and
    // an integer tensor, each written as safetensors from the golden float32 weights.
    let good = dir.path().join("weights_resnet10.safetensors");
    let base = candle_core::safetensors::load(&good, &Device::Cpu)?;
    let varmap = VarMap::new();
    cfg.build(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
    type Edit = Box<dyn Fn(&mut std::collections::HashMap<String, Tensor>)>;
    let cases: [(&str, Edit, &str); 4] = [
        (
            "missing",
            Box::new(|t| {
                t.remove("layer3.0.bn2.running_var");
            }),
            "missing: [\"layer3.0.bn2.running_var\"]",
        ),
        (
            "unexpected",
            Box::new(|t| {
                let v = t["fc.bias"].clone();
                t.insert("head.fc.bias".into(), v);
            }),
            "not in the network: [\"head.fc.bias\"]",
        ),
        (
            "shape",
            Box::new(|t| {
                let v = t["fc.weight"].narrow(0, 0, 5).unwrap();
                t.insert("fc.weight".into(), v);
            }),
            "fc.weight: expected shape [10, 512], found [5, 512]",
        ),
        (
            "dtype",
            Box::new(|t| {
                let v = t["bn1.weight"].to_dtype(DType::I64).unwrap();
                t.insert("bn1.weight".into(), v);
            }),
            "bn1.weight: dtype I64 is not floating point",
        ),
    ];
    for (case, edit, want) in cases {
        let mut t = base.clone();
        edit(&mut t);
        let path = dir.path().join(format!("{case}.safetensors"));
        candle_core::safetensors::save(&t, &path)?;
        let err = trainer::checkpoint::load_weights(&varmap, &path)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("{case}.safetensors")) && err.contains(want),
            "{case}: {err}"
        );
    }
    Ok(())
}

// ---- Vision Transformers (tests/golden/vit_golden.py -> vit_forward.json) ----

fn vit_golden() -> Value {
    json(include_str!("golden/vit_forward.json"))
}

/// timm's per-block rates come from `torch.linspace` in float32; ours are the same line in
/// float64, so they agree to float32 rounding.
#[test]
fn vit_drop_path_schedule_equals_timm() {
    let g = vit_golden();
    let want = flat(&g["drop_probs"]["probs"]);
    let got = trainer::model::drop_path_rates(g["drop_probs"]["rate"].as_f64().unwrap(), 12);
    assert_eq!(got.len(), want.len());
    assert!(max_abs_diff(&got, &want) < 1e-8, "{got:?} vs {want:?}");
}

/// timm's `resize_pos_embed` (bicubic, `align_corners=False`) against ours, in float64, up and
/// down and to a non-square grid: the interpolation weights are the same to rounding.
#[test]
fn vit_position_embedding_resampling_equals_timm() -> Result<()> {
    let g = vit_golden();
    let pos = tensor_of("pos_embed", &[1, 17, 8])?.to_dtype(DType::F64)?;
    for (grid, want) in g["resample"].as_object().unwrap() {
        let (h, w) = grid.split_once('x').unwrap();
        let to = (h.parse().unwrap(), w.parse().unwrap());
        let got = trainer::model::resample_pos_embed(&pos, (4, 4), to, 1)?;
        let diff = max_abs_diff(&flat_t(&got)?, &flat(want));
        println!("resample 4x4 -> {grid}: max|d| {diff:.2e}");
        assert!(diff < 1e-12, "{grid}: {diff}");
    }
    Ok(())
}

/// One ViT in float64 and float32 against timm: eval logits, train logits with the trainer's
/// drop-path masks (rate 0.5; `drop_path_scales` per branch stream), gradient norms of
/// `sum(train_logits * coef)`, and eval logits at 48 px (a 3x3 grid) through the on-the-fly
/// resampling of the 2x2 embedding, against timm's model built at 48 px with the embedding
/// resized by `resize_pos_embed`.
///
/// Tolerances: float64 1e-12 on logits and 1e-10 relative on gradient norms (same math,
/// different summation order; measured 4e-15 and 2e-14). float32 1e-5 on logits (of magnitude
/// ~1: LayerNorm keeps activations near unit scale, so rounding is not amplified as in the
/// train-mode BN nets; measured 1.2e-6) and 1e-5 relative on gradient norms (measured 3.7e-7),
/// norms below 1e-4 of the largest compared against that floor.
fn check_vit(name: &str) -> Result<()> {
    let g = vit_golden();
    let num_classes = g["num_classes"].as_u64().unwrap() as usize;
    let in_shape: Vec<usize> = flat(&g["input_shape"])
        .iter()
        .map(|&d| d as usize)
        .collect();
    let img = in_shape[2];
    let img_test = g["img_test"].as_u64().unwrap() as usize;
    let rate = g["drop_path_rate"].as_f64().unwrap();
    let seed = g["seed"].as_u64().unwrap();
    let cfg = NetConfig::by_name(name)
        .unwrap()
        .with_num_classes(num_classes)
        .with_drop_path_rate(rate)
        .with_img_size(img);
    for (dtype, key, logits_tol, grad_tol, floor_rel) in [
        (DType::F64, "f64", 1e-12, 1e-10, 0.0),
        (DType::F32, "f32", 1e-5, 1e-5, 1e-4),
    ] {
        let want = &g["models"][name][key];
        let model = golden_model(&cfg, dtype)?;
        let xs = raw("input", &in_shape, dtype)?;
        let coef = raw("loss_coef", &[2, num_classes], dtype)?;
        let eval = max_abs_diff(
            &flat_t(&model.forward_eval(&xs)?)?,
            &flat(&want["eval_logits"]),
        );
        let train_logits = model.forward_train(&xs, seed)?;
        let train = max_abs_diff(&flat_t(&train_logits)?, &flat(&want["train_logits"]));
        let grads = (train_logits * coef)?.sum_all()?.backward()?;
        let want_norms = want["grad_norms"].as_object().unwrap();
        let largest = want_norms
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(0.0, f64::max);
        let trainable = model.trainable_vars()?;
        assert_eq!(
            trainable.len(),
            want_norms.len(),
            "{name}: trainable tensors"
        );
        let mut grad_rel: f64 = 0.0;
        for (pname, var) in &trainable {
            let want = want_norms[pname].as_f64().unwrap();
            let got = match grads.get(var.as_tensor()) {
                Some(t) => t
                    .to_dtype(DType::F64)?
                    .sqr()?
                    .sum_all()?
                    .sqrt()?
                    .to_scalar::<f64>()?,
                None => 0.0,
            };
            let rel = (got - want).abs() / want.max(floor_rel * largest).max(1e-12);
            assert!(
                rel < grad_tol,
                "{name} {key} {pname}: grad norm {got:e}, timm {want:e}"
            );
            grad_rel = grad_rel.max(rel);
        }
        let xb = raw("input48", &[2, 3, img_test, img_test], dtype)?;
        let eval48 = max_abs_diff(
            &flat_t(&model.forward_eval(&xb)?)?,
            &flat(&want["eval_logits_48px"]),
        );
        println!(
            "{name} {key}: max|d eval| {eval:.2e}, max|d train| {train:.2e}, max rel d grad norm {grad_rel:.2e}, max|d eval 48px| {eval48:.2e}"
        );
        assert!(
            eval < logits_tol,
            "{name} {key}: eval logits differ by {eval}"
        );
        assert!(
            train < logits_tol,
            "{name} {key}: train logits differ by {train}"
        );
        assert!(
            grad_rel < grad_tol,
            "{name} {key}: gradient norms differ by {grad_rel}"
        );
        assert!(
            eval48 < logits_tol,
            "{name} {key}: 48 px logits differ by {eval48}"
        );
    }
    Ok(())
}

#[test]
fn vit_tiny_matches_timm() -> Result<()> {
    check_vit("vit_tiny_patch16_224")
}

#[test]
fn vit_small_matches_timm() -> Result<()> {
    check_vit("vit_small_patch16_224")
}

/// Weights stored at one grid and loaded for evaluation at another: ViT-Ti's golden weights at
/// 32 px (a 2x2 grid) saved, loaded into the network built at 48 px (3x3), whose loader resamples
/// `pos_embed` as timm's `checkpoint_filter_fn` does: the 48 px eval logits equal timm's model
/// built at 48 px with `resize_pos_embed` (f64, same bound as the forward check).
#[test]
fn vit_weights_of_another_grid_load_resampled() -> Result<()> {
    let g = vit_golden();
    let name = "vit_tiny_patch16_224";
    let num_classes = g["num_classes"].as_u64().unwrap() as usize;
    let img_test = g["img_test"].as_u64().unwrap() as usize;
    let cfg = NetConfig::by_name(name)
        .unwrap()
        .with_num_classes(num_classes);
    let small = golden_model(&cfg.clone().with_img_size(32), DType::F64)?;
    let dir = std::env::temp_dir().join(format!("vit-grid-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("w.safetensors");
    let tensors: std::collections::HashMap<String, Tensor> = small
        .params()
        .iter()
        .map(|p| (p.name.clone(), p.tensor.clone()))
        .collect();
    candle_core::safetensors::save(&tensors, &path)?;

    let varmap = VarMap::new();
    let big = cfg.with_img_size(img_test).build(VarBuilder::from_varmap(
        &varmap,
        DType::F64,
        &Device::Cpu,
    ))?;
    trainer::checkpoint::load_weights(&varmap, &path).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let xb = raw("input48", &[2, 3, img_test, img_test], DType::F64)?;
    let diff = max_abs_diff(
        &flat_t(&big.forward_eval(&xb)?)?,
        &flat(&g["models"][name]["f64"]["eval_logits_48px"]),
    );
    println!("{name}: 32 px weights loaded at 48 px: max|d logits| {diff:.2e}");
    assert!(diff < 1e-12, "{diff}");
    Ok(())
}

/// `timm_data_cfg` equals timm 0.5.4's `default_cfgs` (sizes, crop, interpolation) for every
/// name.
#[test]
fn model_data_defaults_equal_timm_default_cfg() {
    let golden = json(include_str!("golden/model_data.json"));
    let models = golden["models"].as_object().unwrap();
    assert_eq!(models.len(), model_names().len());
    for (name, want) in models {
        let got = trainer::model::timm_data_cfg(name).unwrap_or_else(|| panic!("{name}"));
        assert_eq!(
            got.train_size_px as u64,
            want["train_size_px"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            got.test_size_px as u64,
            want["test_size_px"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(got.crop_pct, want["crop_pct"].as_f64().unwrap(), "{name}");
        let interp = format!("{:?}", got.interpolation).to_lowercase();
        assert_eq!(interp, want["interpolation"].as_str().unwrap(), "{name}");
    }
}
