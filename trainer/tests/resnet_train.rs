//! timm initialisation statistics, stochastic-depth plumbing and a tiny training run.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{loss::cross_entropy, ModuleT, Optimizer, VarMap, SGD};
use trainer::model::{BlockKind, ParamKind, ResNet, ResNetConfig};

fn tiny(block: BlockKind, num_classes: usize) -> ResNetConfig {
    ResNetConfig {
        block,
        layers: [1, 1, 1, 1],
        ..ResNetConfig::by_name("resnet18")
            .unwrap()
            .with_num_classes(num_classes)
    }
}

fn stats(t: &Tensor) -> Result<(f64, f64)> {
    let v = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    Ok((mean, var.sqrt()))
}

#[test]
fn timm_init_statistics() -> Result<()> {
    let dev = Device::Cpu;
    for block in [BlockKind::Basic, BlockKind::Bottleneck] {
        let cfg = tiny(block, 1000);
        let model = cfg.build_seeded(&VarMap::new(), 7, DType::F32, &dev)?;
        let last_bn = if block == BlockKind::Basic {
            ".bn2."
        } else {
            ".bn3."
        };
        for p in model.params() {
            let (mean, std) = stats(&p.tensor)?;
            let d = p.tensor.dims();
            match p.kind {
                ParamKind::ConvWeight => {
                    let want = (2.0 / (d[0] * d[2] * d[3]) as f64).sqrt();
                    let n = p.tensor.elem_count() as f64;
                    // Sampling error of a std estimate is ~ std / sqrt(2n); allow 5 sigma.
                    let tol = 5.0 / (2.0 * n).sqrt();
                    assert!(
                        (std / want - 1.0).abs() < tol,
                        "{}: std {std} want {want}",
                        p.name
                    );
                    assert!(
                        mean.abs() < 5.0 * want / n.sqrt(),
                        "{}: mean {mean}",
                        p.name
                    );
                }
                ParamKind::BnWeight { zero_init } => {
                    let in_branch_end = p.name.starts_with("layer") && p.name.contains(last_bn);
                    assert_eq!(zero_init, in_branch_end, "{}", p.name);
                    assert_eq!(
                        (mean, std),
                        (if zero_init { 0.0 } else { 1.0 }, 0.0),
                        "{}",
                        p.name
                    );
                }
                ParamKind::BnBias | ParamKind::BnRunningMean => assert_eq!((mean, std), (0.0, 0.0)),
                ParamKind::BnRunningVar => assert_eq!((mean, std), (1.0, 0.0)),
                ParamKind::LinearWeight | ParamKind::LinearBias { .. } => {
                    let bound = 1.0 / (cfg.num_features() as f64).sqrt();
                    let v = p.tensor.flatten_all()?.to_vec1::<f32>()?;
                    assert!(v.iter().all(|x| (x.abs() as f64) <= bound), "{}", p.name);
                    if p.kind == ParamKind::LinearWeight {
                        // U(-b, b) has std b / sqrt(3).
                        assert!(
                            (std / (bound / 3f64.sqrt()) - 1.0).abs() < 0.01,
                            "{}",
                            p.name
                        );
                    }
                }
                ParamKind::ConvBias { .. } | ParamKind::Conv1dWeight { .. } => {
                    unreachable!("no channel attention in this config")
                }
                ParamKind::LinearWeightNormal
                | ParamKind::ZeroBias
                | ParamKind::ConvWeightGrouped { .. }
                | ParamKind::LinearWeightFanOut
                | ParamKind::TruncNormal02
                | ParamKind::ConvWeightDefault { .. }
                | ParamKind::LnWeight
                | ParamKind::LnBias => {
                    unreachable!("RegNet's, EfficientNet's and ViT's init, not a ResNet's")
                }
            }
        }
    }
    // A run is a function of its seed.
    let cfg = tiny(BlockKind::Basic, 10);
    let a = cfg.build_seeded(&VarMap::new(), 1, DType::F32, &dev)?;
    let b = cfg.build_seeded(&VarMap::new(), 1, DType::F32, &dev)?;
    let c = cfg.build_seeded(&VarMap::new(), 2, DType::F32, &dev)?;
    let w = |m: &ResNet| m.params()[0].tensor.flatten_all()?.to_vec1::<f32>();
    assert_eq!(w(&a)?, w(&b)?);
    assert_ne!(w(&a)?, w(&c)?);
    Ok(())
}

#[test]
fn se_conv_biases_follow_pytorch_default() -> Result<()> {
    let cfg = ResNetConfig {
        attention: trainer::model::Attention::SqueezeExcite,
        ..tiny(BlockKind::Bottleneck, 10)
    };
    let model = cfg.build_seeded(&VarMap::new(), 3, DType::F32, &Device::Cpu)?;
    let mut seen = 0;
    for p in model.params() {
        if let ParamKind::ConvBias { fan_in } = p.kind {
            let bound = 1.0 / (fan_in as f32).sqrt();
            let v = p.tensor.to_vec1::<f32>()?;
            assert!(
                v.iter().all(|x| x.abs() <= bound) && v.iter().any(|&x| x != 0.0),
                "{}",
                p.name
            );
            seen += 1;
        }
    }
    assert_eq!(seen, 8, "fc1 and fc2 biases of four SE modules");
    Ok(())
}

#[test]
fn drop_path_is_seeded_and_off_in_eval() -> Result<()> {
    let dev = Device::Cpu;
    let cfg = tiny(BlockKind::Basic, 5).with_drop_path_rate(0.5);
    let model = cfg.build_seeded(&VarMap::new(), 0, DType::F32, &dev)?;
    // Non-zero last gammas, so the residual branches (and their masks) change the output.
    for p in model.params() {
        if let ParamKind::BnWeight { zero_init: true } = p.kind {
            p.var()?.set(&p.tensor.ones_like()?)?;
        }
    }
    let xs = Tensor::from_vec(
        (0..8 * 3 * 32 * 32)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect::<Vec<_>>(),
        (8, 3, 32, 32),
        &dev,
    )?;
    let v = |t: Tensor| t.flatten_all()?.to_vec1::<f32>();
    let a = v(model.forward_train(&xs, 11)?)?;
    let again = v(model.forward_train(&xs, 11)?)?;
    let other = v(model.forward_train(&xs, 12)?)?;
    // BN running stats changed between calls but train mode ignores them: equal seeds, equal output.
    assert_eq!(a, again);
    assert_ne!(a, other);
    // ModuleT: the seed is consumed; a second training forward without one is an error.
    model.set_drop_path_seed(11);
    assert_eq!(v(model.forward_t(&xs, true)?)?, a);
    let err = model.forward_t(&xs, true).unwrap_err().to_string();
    assert!(err.contains("drop-path seed"), "{err}");
    // Eval needs no seed and is deterministic.
    assert_eq!(
        v(model.forward_t(&xs, false)?)?,
        v(model.forward_eval(&xs)?)?
    );
    Ok(())
}

#[test]
fn timm_style_checkpoint_loads_by_name() -> Result<()> {
    // A checkpoint as timm exports it: every state_dict key, num_batches_tracked included.
    let dev = Device::Cpu;
    let cfg = ResNetConfig {
        attention: trainer::model::Attention::SqueezeExcite,
        ..tiny(BlockKind::Bottleneck, 3)
    };
    let source = cfg.build_seeded(&VarMap::new(), 21, DType::F32, &dev)?;
    let mut tensors: std::collections::HashMap<String, Tensor> = source
        .params()
        .iter()
        .map(|p| (p.name.clone(), p.tensor.clone()))
        .collect();
    for (name, _) in source.running_stats() {
        if let Some(prefix) = name.strip_suffix(".running_mean") {
            tensors.insert(
                format!("{prefix}.num_batches_tracked"),
                Tensor::new(7i64, &dev)?,
            );
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("timm.safetensors");
    candle_core::safetensors::save(&tensors, &path)?;
    let xs = Tensor::from_vec(
        (0..2 * 3 * 32 * 32)
            .map(|i| (i % 17) as f32 / 8.0 - 1.0)
            .collect(),
        (2, 3, 32, 32),
        &dev,
    )?;
    let want = source.forward_eval(&xs)?.flatten_all()?.to_vec1::<f32>()?;

    // Inference: a VarBuilder over the file's tensors, keyed by timm names.
    let loaded = candle_core::safetensors::load(&path, &dev)?;
    let model = cfg.build(candle_nn::VarBuilder::from_tensors(
        loaded,
        DType::F32,
        &dev,
    ))?;
    assert_eq!(
        model.forward_eval(&xs)?.flatten_all()?.to_vec1::<f32>()?,
        want
    );
    assert!(
        model.trainable_vars().is_err(),
        "file-backed tensors are not trainable variables"
    );

    // Fine-tuning: a VarMap model, then VarMap::load (extra keys such as num_batches_tracked are ignored).
    let mut varmap = VarMap::new();
    let model = cfg.build_seeded(&varmap, 99, DType::F32, &dev)?;
    varmap.load(&path)?;
    assert_eq!(
        model.forward_eval(&xs)?.flatten_all()?.to_vec1::<f32>()?,
        want
    );
    Ok(())
}

#[test]
fn a_few_sgd_steps_reduce_the_loss() -> Result<()> {
    let dev = Device::Cpu;
    let (n, classes) = (8, 4);
    let cfg = tiny(BlockKind::Basic, classes).with_drop_path_rate(0.05);
    let varmap = VarMap::new();
    let model = cfg.build_seeded(&varmap, 5, DType::F32, &dev)?;
    let params = model.trainable_vars()?;
    let stats_before: Vec<Vec<f32>> = model
        .running_stats()
        .iter()
        .map(|(_, t)| t.to_vec1::<f32>())
        .collect::<Result<_>>()?;
    assert_eq!(params.len() + stats_before.len(), model.params().len());
    assert!(params.iter().all(|(name, _)| !name.contains("running")));
    // Every VarMap entry is a model tensor: running statistics are checkpointed with the rest.
    assert_eq!(varmap.all_vars().len(), model.params().len());

    let mut rng = loader::rng::Rng::new(99);
    let xs: Vec<f32> = (0..n * 3 * 32 * 32).map(|_| rng.normal() as f32).collect();
    let xs = Tensor::from_vec(xs, (n, 3, 32, 32), &dev)?;
    let ys = Tensor::from_vec(
        (0..n as u32)
            .map(|i| i % classes as u32)
            .collect::<Vec<_>>(),
        n,
        &dev,
    )?;
    let mut sgd = SGD::new(params.into_iter().map(|(_, v)| v).collect(), 0.05)?;
    let mut losses = Vec::new();
    for step in 0..6u64 {
        let logits = model.forward_train(&xs, loader::rng::derive(5, &[0, step]))?;
        let loss = cross_entropy(&logits, &ys)?;
        losses.push(loss.to_scalar::<f32>()?);
        sgd.backward_step(&loss)?;
    }
    println!("losses: {losses:?}");
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(
        losses[5] < 0.8 * losses[0],
        "loss did not go down: {losses:?}"
    );
    let stats_after: Vec<Vec<f32>> = model
        .running_stats()
        .iter()
        .map(|(_, t)| t.to_vec1::<f32>())
        .collect::<Result<_>>()?;
    assert_ne!(
        stats_before, stats_after,
        "training forwards update the running statistics"
    );
    Ok(())
}

/// timm v0.5.4's ViT init (`init_weights('')`): trunc_normal(std .02) for the class token, the
/// position embedding and every linear weight, the head included (`self.apply` passes no module
/// name, so the zero-head branch of `_init_vit_weights` is not taken), zero linear biases,
/// LayerNorm 1 and 0, and PyTorch's default conv init for the patch embedding.
#[test]
fn vit_init_statistics() -> Result<()> {
    let cfg = trainer::model::VitConfig {
        depth: 2,
        img_size: 64,
        ..trainer::model::VitConfig::by_name("vit_tiny_patch16_224").unwrap()
    };
    let model = trainer::model::NetConfig::from(cfg).build_seeded(
        &VarMap::new(),
        5,
        DType::F32,
        &Device::Cpu,
    )?;
    for p in model.params() {
        let (mean, std) = stats(&p.tensor)?;
        let n = p.tensor.elem_count() as f64;
        let v = p.tensor.flatten_all()?.to_vec1::<f32>()?;
        match p.kind {
            ParamKind::TruncNormal02 => {
                assert!(
                    (std / 0.02 - 1.0).abs() < 5.0 / (2.0 * n).sqrt(),
                    "{}: std {std}",
                    p.name
                );
                assert!(
                    mean.abs() < 5.0 * 0.02 / n.sqrt(),
                    "{}: mean {mean}",
                    p.name
                );
            }
            ParamKind::ZeroBias | ParamKind::LnBias => assert_eq!((mean, std), (0.0, 0.0)),
            ParamKind::LnWeight => assert_eq!((mean, std), (1.0, 0.0), "{}", p.name),
            ParamKind::ConvWeightDefault { fan_in } | ParamKind::ConvBias { fan_in } => {
                assert_eq!(fan_in, 3 * 16 * 16);
                let bound = 1.0 / (fan_in as f64).sqrt();
                assert!(v.iter().all(|x| (x.abs() as f64) <= bound), "{}", p.name);
                assert!(std > 0.0, "{}", p.name);
            }
            other => panic!("{}: unexpected kind {other:?} in a ViT", p.name),
        }
        let want_kind = match p.name.as_str() {
            "cls_token" | "pos_embed" | "head.weight" => Some(ParamKind::TruncNormal02),
            "head.bias" => Some(ParamKind::ZeroBias),
            _ => None,
        };
        if let Some(k) = want_kind {
            assert_eq!(p.kind, k, "{}", p.name);
        }
    }
    Ok(())
}
