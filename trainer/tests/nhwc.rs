//! The channels-last network equals the NCHW network (CPU, f32): logits, every gradient and the
//! BatchNorm running statistics after a training step, and the evaluation logits.
//!
//! On the CPU the channels-last layer functions are the NCHW ops between permutes, so the two
//! differ only in summation order inside candle's convolutions: the tolerance is 1e-4 relative
//! (observed: about 1e-6). This pins the model's channels-last wiring (stem, fused BN + ReLU,
//! pooling, shortcut, SE, ResNet-D pooled shortcut, stochastic depth); the GPU tests then compare
//! each CUDA op with these same references.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarMap;
use trainer::model::{ActivationLayout, ResNetConfig};

fn rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?.flatten_all()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?;
    let num = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let den = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt().max(1e-12);
    Ok(num / den)
}

fn compare(name: &str, cfg: ResNetConfig) -> Result<()> {
    let dev = Device::Cpu;
    let (vm_a, vm_b) = (VarMap::new(), VarMap::new());
    let a = cfg.build_seeded(&vm_a, 5, DType::F32, &dev)?;
    let mut b = cfg.build_seeded(&vm_b, 5, DType::F32, &dev)?;
    b.set_layout(ActivationLayout::Nhwc);
    // zero_init_last makes the last BN of each branch silent: give every gamma a value so the
    // branches (and their gradients) are exercised.
    for model in [&a, &b] {
        for (pname, var) in model.trainable_vars()? {
            if pname.ends_with("bn3.weight") || pname.ends_with("bn2.weight") {
                var.set(&Tensor::full(0.7f32, var.shape(), &dev)?)?;
            }
        }
    }
    let x = Tensor::randn(0f32, 1.0, (3, 3, 32, 32), &dev)?;
    let x_nhwc = x.permute((0, 2, 3, 1))?.contiguous()?;
    let seed = 99;
    let la = a.forward_train(&x, seed)?;
    let lb = b.forward_train(&x_nhwc, seed)?;
    let r = rel(&lb, &la)?;
    assert!(r < 1e-4, "{name}: train logits differ, rel {r:e}");
    let ga = la.sqr()?.sum_all()?.backward()?;
    let gb = lb.sqr()?.sum_all()?.backward()?;
    for ((na, va), (_, vb)) in a.trainable_vars()?.iter().zip(b.trainable_vars()?.iter()) {
        let (Some(da), Some(db)) = (ga.get(va.as_tensor()), gb.get(vb.as_tensor())) else {
            panic!("{name}: {na} has no gradient in one of the layouts")
        };
        let r = rel(db, da)?;
        assert!(r < 1e-4, "{name}: gradient of {na} differs, rel {r:e}");
    }
    for ((na, ta), (_, tb)) in a.running_stats().iter().zip(b.running_stats().iter()) {
        let r = rel(tb, ta)?;
        assert!(
            r < 1e-5,
            "{name}: running statistic {na} differs, rel {r:e}"
        );
    }
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
        squeeze_excite: true,
        ..cfg
    };
    compare("resnet18-d-se", cfg)?;
    let rx = ResNetConfig {
        layers: [1, 1, 1, 1],
        num_classes: 3,
        ..ResNetConfig::by_name("resnext50_32x4d").unwrap()
    };
    compare("resnext-like", rx)
}
