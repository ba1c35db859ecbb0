//! The channels-last network equals the NCHW network (CPU, f32): logits, every gradient and the
//! BatchNorm running statistics after a training step, and the evaluation logits.
//!
//! On the CPU the channels-last network runs the CPU kernels of the fast path
//! (`trainer::ops::cpu`; squeeze-excite's small excitation graph through candle's ops),
//! the NCHW network candle's ops, so the two differ by the kernels' rounding: logits within 1e-4
//! relative, gradients within 5e-4 (see `compare`; each op is checked at 1e-5 in
//! `tests/cpu_ops.rs`). This pins the model's channels-last wiring (stem, fused BN + ReLU,
//! pooling, shortcut, SE, ResNet-D pooled shortcut, stochastic depth); the GPU tests then compare
//! each CUDA op with the references.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarMap;
use trainer::model::{ActivationLayout, ResNet, ResNetConfig};

fn rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?.flatten_all()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?;
    let num = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let den = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt().max(1e-12);
    Ok(num / den)
}

/// Asserts every trainable variable has a gradient in both stores, of one shape, within `tol`
/// relative; returns the worst relative difference. A gradient whose norm is below `floor_rel`
/// times the largest gradient norm of `a` is compared against that floor instead (for gradients
/// that are zero in exact arithmetic, see `compare_at`); 0 compares every one with itself.
fn same_gradients(
    name: &str,
    (a, ga): (&ResNet, &GradStore),
    (b, gb): (&ResNet, &GradStore),
    tol: f64,
    floor_rel: f64,
) -> Result<f64> {
    let norm = |t: &Tensor| -> Result<f64> {
        t.to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()
            .map(f64::sqrt)
    };
    let mut largest = 0f64;
    for (_, v) in a.trainable_vars()? {
        if let Some(g) = ga.get(v.as_tensor()) {
            largest = largest.max(norm(g)?);
        }
    }
    let mut worst = 0f64;
    for ((na, va), (_, vb)) in a.trainable_vars()?.iter().zip(b.trainable_vars()?.iter()) {
        let (Some(da), Some(db)) = (ga.get(va.as_tensor()), gb.get(vb.as_tensor())) else {
            panic!("{name}: {na} has no gradient in one of the two")
        };
        assert_eq!(da.dims(), db.dims(), "{name}: {na} gradient shape");
        let (n, floor) = (norm(da)?, floor_rel * largest);
        let r = if n < floor {
            norm(&(db - da)?)? / floor
        } else {
            rel(db, da)?
        };
        worst = worst.max(r);
        assert!(r < tol, "{name}: gradient of {na} differs, rel {r:e}");
    }
    Ok(worst)
}

fn same_running_stats(name: &str, a: &ResNet, b: &ResNet, tol: f64) {
    same_running_stats_floor(name, a, b, tol, 0.0)
}

/// [`same_running_stats`], a statistic whose norm is below `floor_rel` times the largest one's
/// compared against that floor (statistics that are zero in exact arithmetic).
fn same_running_stats_floor(name: &str, a: &ResNet, b: &ResNet, tol: f64, floor_rel: f64) {
    let norm = |t: &Tensor| {
        t.to_dtype(DType::F64)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .sqrt()
    };
    let largest = a
        .running_stats()
        .iter()
        .map(|(_, t)| norm(t))
        .fold(0.0, f64::max);
    for ((na, ta), (_, tb)) in a.running_stats().iter().zip(b.running_stats().iter()) {
        let floor = floor_rel * largest;
        let r = if norm(ta) < floor {
            norm(&(tb - ta).unwrap()) / floor
        } else {
            rel(tb, ta).unwrap()
        };
        assert!(r < tol, "{name}: running statistic {na} differs, rel {r:e}");
    }
}

/// Standard normal values from a fixed seed (candle's `randn` draws a new input every run, which
/// made the tolerances below a matter of luck).
fn normal(shape: &[usize], seed: u64) -> Result<Tensor> {
    let mut rng = loader::rng::Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

fn compare(name: &str, cfg: impl Into<trainer::model::NetConfig>) -> Result<()> {
    compare_at(name, cfg, 32, 1e-5, 0.0)
}

/// [`compare`] on `size` x `size` images, running statistics within `stats_tol` (relative),
/// gradients and running statistics below `grad_floor_rel` of the largest against that floor
/// (see `same_gradients`).
fn compare_at(
    name: &str,
    cfg: impl Into<trainer::model::NetConfig>,
    size: usize,
    stats_tol: f64,
    grad_floor_rel: f64,
) -> Result<()> {
    let cfg: trainer::model::NetConfig = cfg.into();
    let dev = Device::Cpu;
    let (vm_a, vm_b) = (VarMap::new(), VarMap::new());
    let a = cfg.build_seeded(&vm_a, 5, DType::F32, &dev)?;
    let mut b = cfg.build_seeded(&vm_b, 5, DType::F32, &dev)?;
    b.set_layout(ActivationLayout::Nhwc);
    // zero_init_last makes the last BN of each branch silent: give every gamma a value so the
    // branches (and their gradients) are exercised.
    for model in [&a, &b] {
        for (pname, var) in model.trainable_vars()? {
            let last = ["bn3.weight", "bn2.weight", "conv3.bn.weight"];
            if last.iter().any(|l| pname.ends_with(l)) {
                var.set(&Tensor::full(0.7f32, var.shape(), &dev)?)?;
            }
        }
    }
    let x = normal(&[3, 3, size, size], 1)?;
    let x_nhwc = x.permute((0, 2, 3, 1))?.contiguous()?;
    let seed = 99;
    let la = a.forward_train(&x, seed)?;
    let lb = b.forward_train(&x_nhwc, seed)?;
    let r = rel(&lb, &la)?;
    assert!(r < 1e-4, "{name}: train logits differ, rel {r:e}");
    let ga = la.sqr()?.sum_all()?.backward()?;
    let gb = lb.sqr()?.sum_all()?.backward()?;
    // The gradients reach the stem through every BatchNorm of the network, at batches as small
    // as 3 values per channel (layer4 at 1x1): the per-op differences of the CPU kernels
    // (about 1e-7, `tests/cpu_ops.rs`) grow to about 1.2e-4 at the first layers.
    let worst = same_gradients(name, (&a, &ga), (&b, &gb), 5e-4, grad_floor_rel)?;
    println!("{name}: worst gradient rel {worst:e}");
    same_running_stats_floor(name, &a, &b, stats_tol, grad_floor_rel);
    let r = rel(&b.forward_eval(&x_nhwc)?, &a.forward_eval(&x)?)?;
    assert!(r < 1e-4, "{name}: eval logits differ, rel {r:e}");
    Ok(())
}

#[test]
fn channels_last_resnet50_layout_matches_nchw() -> Result<()> {
    let cfg = ResNetConfig {
        layers: [1, 1, 1, 1],
        num_classes: 7,
        ..ResNetConfig::by_name("resnet50").unwrap()
    }
    .with_drop_path_rate(0.2);
    compare("resnet50-like", cfg)
}

#[test]
fn channels_last_basic_resnet_d_se_matches_nchw() -> Result<()> {
    // Basic blocks, deep stem, pooled shortcut and squeeze-excite in one network.
    let cfg = ResNetConfig {
        layers: [1, 1, 1, 1],
        num_classes: 4,
        ..ResNetConfig::by_name("resnet18").unwrap()
    };
    let cfg = ResNetConfig {
        stem: trainer::model::StemKind::Deep { width: 16 },
        avg_down: true,
        attention: trainer::model::Attention::SqueezeExcite,
        ..cfg
    };
    compare("resnet18-d-se", cfg)?;
    let rx = ResNetConfig {
        layers: [1, 1, 1, 1],
        num_classes: 3,
        ..ResNetConfig::by_name("resnext50_32x4d").unwrap()
    };
    compare("resnext-like", rx)?;
    // The ECA-ResNet-T and SENet-154 pieces: tiered stem, ECA, half-width first convs, 3x3
    // strided shortcuts; then ECA with pooled shortcuts.
    let eca = ResNetConfig {
        layers: [1, 1, 1, 1],
        num_classes: 3,
        stem: trainer::model::StemKind::DeepTiered { width: 16 },
        attention: trainer::model::Attention::Eca,
        block_reduce_first: 2,
        down_kernel_size: 3,
        ..ResNetConfig::by_name("resnext50_32x4d").unwrap()
    };
    compare("eca-tiered-reduced", eca.clone())?;
    compare(
        "eca-avg-down",
        ResNetConfig {
            avg_down: true,
            ..eca
        },
    )?;
    // RegNetY: 3x3/2 stem without max-pool, SE after the grouped 3x3.
    let regnet = trainer::model::NetConfig::by_name("regnety_002")
        .unwrap()
        .with_num_classes(4);
    // At 64 px: its last stage has 7 blocks, and at 32 px they would normalise over 3 values
    // per channel (1x1 maps of 3 images), where train-mode BatchNorm amplifies rounding
    // without bound (observed: 0.26 relative on the logits with every branch switched on).
    // 13 blocks deep instead of 4: running statistics to 1e-4 (observed 1.1e-5).
    compare_at("regnety_002", regnet, 64, 1e-4, 0.0)?;
    // EfficientNet-B0: SiLU, depthwise 3x3 and 5x5 convs, adds without activation, conv_head.
    // The bias of each block's last BN has a zero gradient in exact arithmetic (later train-mode
    // BatchNorms remove a per-channel shift; `resnet_golden.rs`, `check_with`): both sides
    // return rounding noise there (observed up to 4.2e-8 of the largest gradient norm in float32
    // after summing thousands of cancelling terms), compared against 1e-3 of the largest norm;
    // likewise the running mean of the BN after a 1x1 conv of such a zero-mean activation.
    let effnet = trainer::model::NetConfig::by_name("efficientnet_b0")
        .unwrap()
        .with_num_classes(4);
    compare_at("efficientnet_b0", effnet, 64, 1e-4, 1e-3)
}

/// The explicit training pass (hand-written trunk backward) equals candle's graph on the same
/// channels-last network: loss, every gradient, running statistics. On the CPU both run the same
/// CPU kernels (the graph through their custom ops' backward), so this pins the chaining (block
/// input sums, shortcut, stochastic depth masks, stem, gradient layouts and keys); `cuda_ops`
/// checks the CUDA layers. Tolerance 1e-5 relative (observed: exact, channel attention's small
/// graph included: the same ops in the same order).
fn explicit_matches_graph(name: &str, cfg: impl Into<trainer::model::NetConfig>) -> Result<()> {
    let cfg: trainer::model::NetConfig = cfg.into();
    use trainer::model::BackwardMode;
    let dev = Device::Cpu;
    let (vm_a, vm_b) = (VarMap::new(), VarMap::new());
    let mut a = cfg.build_seeded(&vm_a, 11, DType::F32, &dev)?;
    let mut b = cfg.build_seeded(&vm_b, 11, DType::F32, &dev)?;
    a.set_layout(ActivationLayout::Nhwc);
    b.set_layout(ActivationLayout::Nhwc);
    a.set_backward_mode(BackwardMode::Graph);
    b.set_backward_mode(BackwardMode::Explicit);
    for model in [&a, &b] {
        for (pname, var) in model.trainable_vars()? {
            if pname.ends_with("bn3.weight") || pname.ends_with("bn2.weight") {
                var.set(&Tensor::full(0.6f32, var.shape(), &dev)?)?;
            }
        }
    }
    let x = normal(&[3, 32, 32, 3], 2)?;
    let target = normal(&[3, cfg.num_classes()], 3)?;
    // Two steps, so the second starts from the running statistics the first left.
    for step in 0..2u64 {
        let (la, pa) = a.forward_train_pass(&x, 40 + step)?;
        let (lb, pb) = b.forward_train_pass(&x, 40 + step)?;
        assert!(!pa.is_explicit() && pb.is_explicit(), "{name}: modes");
        let r = rel(&lb, &la)?;
        assert!(r < 1e-6, "{name}: logits differ, rel {r:e}");
        let loss_a = (la - &target)?.sqr()?.mean_all()?;
        let loss_b = (lb - &target)?.sqr()?.mean_all()?;
        let (ga, gb) = (pa.backward(&loss_a)?, pb.backward(&loss_b)?);
        let worst = same_gradients(name, (&a, &ga), (&b, &gb), 1e-5, 0.0)?;
        println!("{name} step {step}: worst gradient rel {worst:e}");
        same_running_stats(name, &a, &b, 1e-6);
    }
    Ok(())
}

#[test]
fn explicit_backward_matches_graph() -> Result<()> {
    let r50 = ResNetConfig {
        layers: [1, 2, 1, 1],
        num_classes: 5,
        ..ResNetConfig::by_name("resnet50").unwrap()
    }
    .with_drop_path_rate(0.3);
    explicit_matches_graph("resnet50-like, drop path", r50)?;
    let deep = ResNetConfig {
        layers: [1, 1, 1, 1],
        num_classes: 4,
        stem: trainer::model::StemKind::Deep { width: 16 },
        ..ResNetConfig::by_name("resnet18").unwrap()
    };
    explicit_matches_graph("resnet18, deep stem", deep)?;
    let rx = ResNetConfig {
        layers: [1, 1, 1, 1],
        num_classes: 3,
        ..ResNetConfig::by_name("resnext50_32x4d").unwrap()
    };
    explicit_matches_graph("resnext-like", rx)?;
    // Squeeze-excite, ECA with ResNet-D's pooled shortcuts and a tiered stem, and RegNetY (its
    // stem has no max-pool; SE after the grouped 3x3).
    let se = ResNetConfig {
        layers: [1, 1, 1, 1],
        num_classes: 3,
        ..ResNetConfig::by_name("seresnet50").unwrap()
    }
    .with_drop_path_rate(0.2);
    explicit_matches_graph("seresnet50-like, drop path", se)?;
    let eca = ResNetConfig {
        layers: [1, 1, 1, 1],
        num_classes: 3,
        ..ResNetConfig::by_name("ecaresnet50t").unwrap()
    };
    explicit_matches_graph("ecaresnet50t-like", eca)?;
    let regnet = trainer::model::NetConfig::by_name("regnety_002")
        .unwrap()
        .with_num_classes(4)
        .with_drop_path_rate(0.1);
    explicit_matches_graph("regnety_002, drop path", regnet)?;
    // EfficientNet (SiLU, depthwise-separable and inverted-residual blocks, residual adds
    // without an activation, the head conv) and EfficientNetV2's edge residual blocks.
    for name in ["efficientnet_b0", "efficientnetv2_rw_s"] {
        let cfg = trainer::model::NetConfig::by_name(name)
            .unwrap()
            .with_num_classes(3)
            .with_drop_path_rate(0.2);
        explicit_matches_graph(&format!("{name}, drop path"), cfg)?;
    }
    Ok(())
}

#[test]
fn explicit_backward_refuses_what_it_does_not_support() -> Result<()> {
    use trainer::model::BackwardMode;
    let dev = Device::Cpu;
    let cfg = trainer::model::NetConfig::by_name("vit_tiny_patch16_224")
        .unwrap()
        .with_img_size(32)
        .with_num_classes(3);
    let vm = VarMap::new();
    let mut m = cfg.build_seeded(&vm, 1, DType::F32, &dev)?;
    m.set_layout(ActivationLayout::Nhwc);
    let x = normal(&[2, 32, 32, 3], 4)?;
    // Auto falls back to the graph (and would on CUDA too: a ViT has no explicit backward).
    let (_, pass) = m.forward_train_pass(&x, 1)?;
    assert!(!pass.is_explicit());
    m.set_backward_mode(BackwardMode::Explicit);
    let err = m
        .forward_train_pass(&x, 1)
        .err()
        .expect("explicit must refuse a ViT");
    assert!(err.to_string().contains("Vision Transformer"), "{err}");
    let cfg = ResNetConfig {
        layers: [1, 1, 1, 1],
        num_classes: 3,
        ..ResNetConfig::by_name("resnet18").unwrap()
    };
    let mut m = cfg.build_seeded(&VarMap::new(), 1, DType::F32, &dev)?;
    m.set_backward_mode(BackwardMode::Explicit);
    m.set_layout(ActivationLayout::Nchw);
    let err = m
        .forward_train_pass(&x, 1)
        .err()
        .expect("explicit must refuse NCHW");
    assert!(err.to_string().contains("channels-last"), "{err}");
    Ok(())
}
