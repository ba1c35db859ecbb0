//! Gradient reduction overlapped with the explicit backward (CPU, ranks as threads): buckets
//! start while the backward is still running, and the reduced gradients equal those of the
//! reduction after the backward and the sum of the ranks' gradients, bit for bit.

use std::time::Duration;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarMap;
use trainer::dist::{Collective, ThreadGroup};
use trainer::loss::{Targets, TrainLoss};
use trainer::model::{ActivationLayout, BackwardMode, ResNet, ResNetConfig};
use trainer::recipe::Recipe;
use trainer::train::{all_reduce_gradients, BucketReducer, GradAccumulator};

/// ResNet-10 (one basic block per stage), channels-last, explicit backward, drop path on.
fn model() -> Result<(VarMap, ResNet)> {
    let cfg = ResNetConfig {
        layers: [1, 1, 1, 1],
        ..ResNetConfig::by_name("resnet18").unwrap()
    }
    .with_num_classes(5)
    .with_drop_path_rate(0.1);
    let vm = VarMap::new();
    let mut m = cfg.build_seeded(&vm, 3, DType::F32, &Device::Cpu)?;
    m.set_layout(ActivationLayout::Nhwc);
    m.set_backward_mode(BackwardMode::Explicit);
    Ok((vm, m))
}

/// Rank `r`'s batch: 2 images of 32 px (NHWC) and their labels.
fn batch(r: usize) -> Result<(Tensor, Tensor)> {
    let n = 2 * 32 * 32 * 3;
    let xs = Tensor::arange(0f32, n as f32, &Device::Cpu)?
        .affine(0.013 * (r + 1) as f64, 0.1 * r as f64)?
        .sin()?
        .reshape((2, 32, 32, 3))?;
    let labels = Tensor::new(&[r as u32, (r + 2) as u32], &Device::Cpu)?;
    Ok((xs, labels))
}

fn loss(m: &ResNet, r: usize, world: usize) -> Result<(Tensor, trainer::model::TrainPass<'_>)> {
    let (xs, labels) = batch(r)?;
    let (logits, pass) = m.forward_train_pass(&xs, 7)?;
    let loss_fn: TrainLoss = Recipe::a1().train_loss();
    let l = (loss_fn.forward(&logits, Targets::Classes(&labels))? / world as f64)?;
    Ok((l, pass))
}

fn host(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// Every variable's gradient as bits, by name.
type Bits = Vec<(String, Vec<u32>)>;

fn by_name(vars: &[(String, Var)], g: &GradStore) -> Bits {
    vars.iter()
        .map(|(n, v)| (n.clone(), host(g.get(v.as_tensor()).expect("a gradient"))))
        .collect()
}

#[test]
fn overlapped_buckets_equal_the_reduction_after_the_backward() -> Result<()> {
    let world = 2;
    // Reference: each rank's gradients summed in rank order (the tree of two is one addition).
    let mut per_rank = Vec::new();
    for r in 0..world {
        let (_vm, m) = model()?;
        let (l, pass) = loss(&m, r, world)?;
        let g = pass.backward(&l)?;
        per_rank.push(by_name(&m.trainable_vars()?, &g));
    }
    let reference: Bits = per_rank[0]
        .iter()
        .zip(&per_rank[1])
        .map(|((n, a), (_, b))| {
            let s = a
                .iter()
                .zip(b)
                .map(|(x, y)| (f32::from_bits(*x) + f32::from_bits(*y)).to_bits())
                .collect();
            (n.clone(), s)
        })
        .collect();

    for overlapped in [true, false] {
        let results: Vec<(usize, Bits)> = std::thread::scope(|s| {
            let hs: Vec<_> = ThreadGroup::new(world, Duration::from_secs(60))
                .into_iter()
                .map(|mut g| {
                    s.spawn(move || -> Result<_> {
                        let (_vm, m) = model()?;
                        let vars = m.trainable_vars()?;
                        let (l, pass) = loss(&m, g.rank(), world)?;
                        let acc = GradAccumulator::new(&vars);
                        if overlapped {
                            // Small buckets: several start during the backward.
                            let mut red = BucketReducer::new(acc, &mut g, 64 << 10);
                            let rest = pass.backward_hooked(&l, &mut |gs| {
                                red.ready(gs).map_err(candle_core::Error::wrap)
                            })?;
                            let during = red.buckets_during_backward;
                            let store = red.finish(rest).map_err(candle_core::Error::wrap)?;
                            Ok((during, by_name(&vars, &store)))
                        } else {
                            let mut acc = acc;
                            acc.add(pass.backward(&l)?)?;
                            let store = all_reduce_gradients(acc, &mut g)
                                .map_err(candle_core::Error::wrap)?;
                            Ok((0, by_name(&vars, &store)))
                        }
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
        });
        for (during, grads) in &results {
            if overlapped {
                assert!(
                    *during >= 3,
                    "only {during} bucket(s) started during the backward"
                );
            }
            assert_eq!(grads.len(), reference.len());
            for ((n, got), (_, want)) in grads.iter().zip(&reference) {
                assert!(
                    got == want,
                    "overlapped {overlapped}: {n} differs from the reference"
                );
            }
        }
        eprintln!(
            "overlapped {overlapped}: {} bucket(s) started during the backward, {} gradients equal",
            results[0].0,
            reference.len()
        );
    }
    Ok(())
}
