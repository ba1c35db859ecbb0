//! The CPU kernels of the channels-last fast path (`trainer::ops::cpu`, reached through
//! `trainer::ops::nhwc` for f32 CPU tensors) against the references built from candle's NCHW
//! ops (`nhwc::reference`), op by op, forward and backward; and the same bits for any number of
//! threads.
//!
//! Tolerances (relative L2 over the whole tensor): 1e-5 for convolutions (f32 GEMMs summing up
//! to 4,608 products in another order than candle's; observed about 1e-7), 1e-5 for BatchNorm
//! (statistics in f64 here, f32 in candle; observed about 1e-7; 1e-4 at mean 50, where candle's
//! f32 statistics are off by about 4e-5 while these stay within 3e-6 of an f64 computation),
//! exact for the max-pool output, add + ReLU and the channel gate's output and input gradient,
//! 1e-6 for the max-pool gradient (an input that is the maximum of several windows sums their
//! gradients in another order), the average pools and the gate's gradient (a sum over pixels). The explicit pass's layer pairs give the graph ops' results bit for bit.

use candle_core::{DType, Device, Result, Tensor, Var};
use trainer::model::BatchNorm2d;
use trainer::ops::{nhwc, Activation};

fn normal(shape: &[usize], seed: u64, mean: f64) -> Result<Tensor> {
    let mut rng = loader::rng::Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (mean + rng.normal()) as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

fn rel(got: &Tensor, want: &Tensor) -> Result<f64> {
    let g = got.to_dtype(DType::F64)?.flatten_all()?;
    let w = want.to_dtype(DType::F64)?.flatten_all()?;
    let num = (&g - &w)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let den = w.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt().max(1e-30);
    Ok(num / den)
}

fn close(what: &str, got: &Tensor, want: &Tensor, tol: f64) -> Result<()> {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let r = rel(got, want)?;
    println!("{what}: relative error {r:.2e}");
    assert!(r <= tol, "{what}: relative error {r:e} above {tol:e}");
    Ok(())
}

/// Gradients of `sum(f(inputs) * r)` for a fixed `r`, through candle's graph.
fn grads(
    inputs: &[&Tensor],
    r: &Tensor,
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<(Tensor, Vec<Tensor>)> {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t))
        .collect::<Result<_>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts)?;
    let g = (y.clone() * r)?.sum_all()?.backward()?;
    let gs = vars
        .iter()
        .map(|v| g.get(v.as_tensor()).expect("a gradient").clone())
        .collect();
    Ok((y, gs))
}

#[test]
fn convolutions_match_the_reference() -> Result<()> {
    // (n, h, w, c, k, r, stride, pad, groups): every code path (1x1 direct, 1x1 strided, 3x3
    // stride 1 as a flipped forward, 3x3 stride 2 through patch gradients, the 7x7 stem,
    // grouped, sizes that leave a partial tile, GEMMs cut into pieces).
    let cases = [
        (2, 9, 9, 16, 32, 1, 1, 0, 1),
        (3, 8, 8, 32, 64, 1, 2, 0, 1),
        (2, 9, 7, 16, 24, 3, 1, 1, 1),
        (2, 9, 9, 16, 24, 3, 2, 1, 1),
        (2, 23, 21, 3, 16, 7, 2, 3, 1),
        (2, 8, 8, 32, 32, 3, 1, 1, 4),
        (2, 8, 8, 32, 64, 3, 2, 1, 8),
        (1, 50, 50, 8, 8, 3, 1, 1, 1),
        // Few output pixels and wide GEMMs, cut into parallel pieces of columns (1x1) or of
        // rows (the 3x3's filter gradient).
        (2, 4, 4, 128, 512, 1, 1, 0, 1),
        (2, 4, 4, 64, 256, 3, 1, 1, 1),
        // Depthwise (EfficientNet): 3x3 and 5x5, stride 1 and 2, odd sizes, more pixels than a
        // depthwise tile.
        (2, 9, 7, 24, 24, 3, 1, 1, 24),
        (2, 11, 11, 40, 40, 5, 2, 2, 40),
        (3, 16, 14, 16, 16, 3, 2, 1, 16),
        (1, 20, 20, 8, 8, 5, 1, 2, 8),
    ];
    for (i, (n, h, w, c, k, r, stride, pad, groups)) in cases.into_iter().enumerate() {
        let name = format!("conv [{n},{h},{w},{c}] -> {k} k{r} s{stride} p{pad} g{groups}");
        let x = normal(&[n, h, w, c], 10 + i as u64, 0.0)?;
        let wt = (normal(&[k, c / groups, r, r], 20 + i as u64, 0.0)? * 0.1)?;
        let (y_ref, g_ref) = {
            let y = nhwc::reference::conv2d(&x, &wt, stride, pad, groups)?;
            let rr = normal(y.dims(), 30 + i as u64, 0.0)?;
            let (y, g) = grads(&[&x, &wt], &rr, |t| {
                nhwc::reference::conv2d(&t[0], &t[1], stride, pad, groups)
            })?;
            (y, (g, rr))
        };
        let (g_ref, rr) = g_ref;
        // Through candle's graph (the custom op and its backward) ...
        let (y, g) = grads(&[&x, &wt], &rr, |t| {
            nhwc::conv2d(&t[0], &t[1], stride, pad, groups)
        })?;
        close(&format!("{name} forward"), &y, &y_ref, 1e-5)?;
        close(&format!("{name} dx"), &g[0], &g_ref[0], 1e-5)?;
        close(&format!("{name} dw"), &g[1], &g_ref[1], 1e-5)?;
        // ... and through the explicit pass's pair: the same kernels, the same bits.
        let (y2, saved) = nhwc::conv2d_train(&x, &wt, stride, pad, groups)?;
        let (dx2, dw2) = nhwc::conv2d_backward(&saved, &rr, true)?;
        assert_eq!(bits(&y2)?, bits(&y)?, "{name}: train forward");
        assert_eq!(bits(&dx2.unwrap())?, bits(&g[0])?, "{name}: explicit dx");
        assert_eq!(bits(&dw2)?, bits(&g[1])?, "{name}: explicit dw");
    }
    Ok(())
}

fn bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|v| v.to_bits())
        .collect())
}

fn bn(c: usize, seed: u64) -> Result<BatchNorm2d> {
    let w = (normal(&[c], seed, 1.0)? * 0.3)?.affine(1.0, 0.7)?;
    let b = (normal(&[c], seed + 1, 0.0)? * 0.2)?;
    let rm = (normal(&[c], seed + 2, 0.0)? * 0.1)?;
    let rv = normal(&[c], seed + 3, 0.0)?.abs()?.affine(0.5, 0.5)?;
    BatchNorm2d::new(
        Var::from_tensor(&w)?.as_tensor().clone(),
        Var::from_tensor(&b)?.as_tensor().clone(),
        &rm,
        &rv,
    )
}

fn copy_bn(src: &BatchNorm2d) -> Result<BatchNorm2d> {
    BatchNorm2d::new(
        Var::from_tensor(&src.weight().copy()?)?.as_tensor().clone(),
        Var::from_tensor(&src.bias().copy()?)?.as_tensor().clone(),
        &src.running_mean().as_tensor().copy()?,
        &src.running_var().as_tensor().copy()?,
    )
}

/// The evaluation conv with its BatchNorm folded in (+ residual, + ReLU) against the layers run
/// one by one through the references. Tolerance 1e-5 relative: folding changes the rounding
/// (the filter times `gamma / sqrt(var + eps)` in f32, the mean subtracted after the sum);
/// observed about 1e-7.
#[test]
fn folded_conv_bn_matches_the_layers() -> Result<()> {
    // (n, h, w, c, k, r, stride, pad, groups): 1x1, 1x1 in pieces, 3x3 strided, 7x7 stem,
    // grouped.
    let cases = [
        (2, 9, 9, 16, 32, 1, 1, 0, 1),
        (2, 4, 4, 128, 512, 1, 1, 0, 1),
        (2, 9, 9, 16, 24, 3, 2, 1, 1),
        (2, 23, 21, 3, 16, 7, 2, 3, 1),
        (2, 8, 8, 32, 64, 3, 1, 1, 8),
        (2, 11, 11, 40, 40, 5, 2, 2, 40),
    ];
    for (i, (n, h, w, c, k, r, stride, pad, groups)) in cases.into_iter().enumerate() {
        let x = normal(&[n, h, w, c], 40 + i as u64, 0.0)?;
        let wt = (normal(&[k, c / groups, r, r], 50 + i as u64, 0.0)? * 0.1)?;
        let b = bn(k, 60 + i as u64)?;
        let y = nhwc::reference::conv2d(&x, &wt, stride, pad, groups)?;
        let shortcut = normal(y.dims(), 70 + i as u64, 0.0)?;
        for (act, residual) in [
            (Activation::Identity, None),
            (Activation::Relu, None),
            (Activation::Silu, None),
            (Activation::Relu, Some(&shortcut)),
        ] {
            let name = format!(
                "conv+bn [{n},{h},{w},{c}] -> {k} k{r} s{stride} g{groups} {act:?} residual {}",
                residual.is_some()
            );
            let got = nhwc::conv_bn_eval(&x, &wt, stride, pad, groups, &b, act, residual)?;
            let relu = act == Activation::Relu;
            let want = match residual {
                None => nhwc::reference::batch_norm(&y, &b, false, relu)?,
                Some(s) => nhwc::reference::add_relu(
                    &nhwc::reference::batch_norm(&y, &b, false, false)?,
                    s,
                )?,
            };
            // candle's SiLU (libm's expf) against the epilogue's.
            let want = match act {
                Activation::Silu => want.silu()?,
                _ => want,
            };
            close(&name, &got, &want, 1e-5)?;
            // An evaluation pass's cache of folded filters: the same bits, first call or not.
            trainer::ops::cpu::with_eval_cache(|| -> Result<()> {
                for _ in 0..2 {
                    let again =
                        nhwc::conv_bn_eval(&x, &wt, stride, pad, groups, &b, act, residual)?;
                    assert_eq!(bits(&again)?, bits(&got)?, "{name}: cached");
                }
                Ok(())
            })?;
        }
    }
    // The cache lives for one pass: weights changed in place between passes are picked up.
    let x = normal(&[2, 6, 6, 8], 80, 0.0)?;
    let w = Var::from_tensor(&(normal(&[16, 8, 3, 3], 81, 0.0)? * 0.1)?)?;
    let b = bn(16, 82)?;
    let eval = |w: &Tensor| {
        trainer::ops::cpu::with_eval_cache(|| {
            nhwc::conv_bn_eval(&x, w, 1, 1, 1, &b, Activation::Identity, None)
        })
    };
    let first = eval(w.as_tensor())?;
    w.set(&(w.as_tensor() * 2.0)?)?;
    let second = eval(w.as_tensor())?;
    let want = nhwc::reference::batch_norm(
        &nhwc::reference::conv2d(&x, w.as_tensor(), 1, 1, 1)?,
        &b,
        false,
        false,
    )?;
    close(
        "conv+bn after an in-place weight change",
        &second,
        &want,
        1e-5,
    )?;
    assert_ne!(bits(&first)?, bits(&second)?);
    Ok(())
}

/// Training BatchNorm (+ ReLU) of `x` computed in f64 on the host.
fn bn_truth(x: &Tensor, b: &BatchNorm2d, relu: bool) -> Result<Tensor> {
    let c = x.dim(3)?;
    let v = x.flatten_all()?.to_vec1::<f32>()?;
    let g = b.weight().to_vec1::<f32>()?;
    let be = b.bias().to_vec1::<f32>()?;
    let m = v.len() / c;
    let mut out = vec![0f32; v.len()];
    for j in 0..c {
        let col = (0..m).map(|i| v[i * c + j] as f64);
        let mean = col.clone().sum::<f64>() / m as f64;
        let var = col.map(|t| (t - mean) * (t - mean)).sum::<f64>() / m as f64;
        let inv = 1.0 / (var + b.eps()).sqrt();
        for i in 0..m {
            let y = (v[i * c + j] as f64 - mean) * inv * g[j] as f64 + be[j] as f64;
            out[i * c + j] = if relu && y < 0.0 { 0.0 } else { y as f32 };
        }
    }
    Tensor::from_vec(out, x.shape(), &Device::Cpu)
}

#[test]
fn batch_norm_matches_the_reference() -> Result<()> {
    // Spatial sizes that leave partial row chunks; a large mean; with and without ReLU.
    let cases = [
        ([4, 17, 19, 24], 0.0, true),
        ([3, 35, 45, 16], 50.0, false),
        ([2, 3, 3, 8], 0.5, true),
    ];
    for (i, (shape, mean, relu)) in cases.into_iter().enumerate() {
        let name = format!("bn {shape:?} mean {mean} relu {relu}");
        let x = normal(&shape, 40 + i as u64, mean)?;
        let c = shape[3];
        let (b_ref, b_fast) = {
            let b = bn(c, 50 + i as u64 * 7)?;
            (copy_bn(&b)?, b)
        };
        let rr = normal(&shape, 60 + i as u64, 0.0)?;
        let vx = Var::from_tensor(&x)?;
        let y_ref = nhwc::reference::batch_norm(vx.as_tensor(), &b_ref, true, relu)?;
        let g_ref = (y_ref.clone() * &rr)?.sum_all()?.backward()?;
        let vx2 = Var::from_tensor(&x)?;
        let y = nhwc::batch_norm(vx2.as_tensor(), &b_fast, true, relu)?;
        let g = (y.clone() * &rr)?.sum_all()?.backward()?;
        // The output against an f64 computation of the same batch statistics: the CPU kernels
        // sum in f64 and stay within 3e-6 even at mean 50 (the f32 batch mean's half-ulp at 50
        // is 1.9e-6 of a unit-variance output), where candle's f32 statistics lose about 4e-5;
        // against candle then 1e-4 (1e-5 at mean 0).
        let truth = bn_truth(&x, &b_ref, relu)?;
        close(&format!("{name} y against f64"), &y, &truth, 3e-6)?;
        close(
            &format!("{name} candle's y against f64"),
            &y_ref,
            &truth,
            1e-4,
        )?;
        let tol = if mean.abs() > 1.0 { 1e-4 } else { 1e-5 };
        close(&format!("{name} y"), &y, &y_ref, tol)?;
        close(
            &format!("{name} dx"),
            g.get(vx2.as_tensor()).unwrap(),
            g_ref.get(vx.as_tensor()).unwrap(),
            tol,
        )?;
        close(
            &format!("{name} dgamma"),
            g.get(b_fast.weight()).unwrap(),
            g_ref.get(b_ref.weight()).unwrap(),
            tol,
        )?;
        close(
            &format!("{name} dbeta"),
            g.get(b_fast.bias()).unwrap(),
            g_ref.get(b_ref.bias()).unwrap(),
            tol,
        )?;
        close(
            &format!("{name} running mean"),
            b_fast.running_mean().as_tensor(),
            b_ref.running_mean().as_tensor(),
            1e-6,
        )?;
        close(
            &format!("{name} running var"),
            b_fast.running_var().as_tensor(),
            b_ref.running_var().as_tensor(),
            1e-6,
        )?;
        // Evaluation (folded statistics).
        let ye = nhwc::batch_norm(&x, &b_fast, false, relu)?;
        let ye_ref = nhwc::reference::batch_norm(&x, &b_fast, false, relu)?;
        close(&format!("{name} eval"), &ye, &ye_ref, 1e-6)?;
    }
    Ok(())
}

#[test]
fn pooling_and_the_residual_add_match_the_reference() -> Result<()> {
    // Max-pool 3/2/1 with ties (values in {-1, 0, 1, 2}) and without.
    for (i, shape) in [[2, 13, 11, 6], [2, 12, 10, 16]].into_iter().enumerate() {
        let mut rng = loader::rng::Rng::new(70 + i as u64);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                if i == 0 {
                    rng.below(4) as f32 - 1.0
                } else {
                    rng.normal() as f32
                }
            })
            .collect();
        let x = Tensor::from_vec(v, &shape[..], &Device::Cpu)?;
        let y_ref = nhwc::reference::max_pool(&x, 3, 2, 1)?;
        let rr = normal(y_ref.dims(), 80 + i as u64, 0.0)?;
        let (yr, gr) = grads(&[&x], &rr, |t| nhwc::reference::max_pool(&t[0], 3, 2, 1))?;
        let (y, g) = grads(&[&x], &rr, |t| nhwc::max_pool(&t[0], 3, 2, 1))?;
        assert_eq!(bits(&y)?, bits(&yr)?, "max-pool {shape:?}");
        // An input that is the maximum of several windows sums their gradients, in another
        // order than the reference: within an f32 rounding of such sums.
        close(&format!("max-pool {shape:?} dx"), &g[0], &gr[0], 1e-6)?;
        let (y2, saved) = nhwc::max_pool_train(&x, 3, 2, 1)?;
        assert_eq!(bits(&y2)?, bits(&y)?);
        assert_eq!(bits(&nhwc::max_pool_backward(&saved, &rr)?)?, bits(&g[0])?);
    }
    let x = normal(&[3, 7, 5, 40], 90, 0.5)?;
    let rr = normal(&[3, 40], 91, 0.0)?;
    let (yr, gr) = grads(&[&x], &rr, |t| nhwc::reference::global_avg_pool(&t[0]))?;
    let (y, g) = grads(&[&x], &rr, |t| nhwc::global_avg_pool(&t[0]))?;
    close("avg-pool", &y, &yr, 1e-6)?;
    close("avg-pool dx", &g[0], &gr[0], 1e-6)?;
    assert_eq!(
        bits(&nhwc::global_avg_pool_backward(&x, &rr)?)?,
        bits(&g[0])?
    );
    // ResNet-D's 2x2 ceil-mode pool of the shortcut, odd and even sizes, against candle's NCHW
    // pool between permutes (sums of up to four values, then a scale: 1e-6).
    for (i, shape) in [[2, 7, 9, 16], [2, 8, 6, 24]].into_iter().enumerate() {
        let x = normal(&shape, 98 + i as u64, 0.0)?;
        let nchw = |t: &Tensor| -> Result<Tensor> {
            let y = trainer::ops::avg_pool2d_ceil(&t.permute((0, 3, 1, 2))?.contiguous()?)?;
            y.permute((0, 2, 3, 1))?.contiguous()
        };
        let rr = normal(nchw(&x)?.dims(), 110 + i as u64, 0.0)?;
        let (yr, gr) = grads(&[&x], &rr, |t| nchw(&t[0]))?;
        let (y, g) = grads(&[&x], &rr, |t| nhwc::avg_pool2d_ceil(&t[0]))?;
        close(&format!("2x2 ceil pool {shape:?}"), &y, &yr, 1e-6)?;
        close(&format!("2x2 ceil pool {shape:?} dx"), &g[0], &gr[0], 1e-6)?;
    }
    // Channel attention's gate, x * gate[sample, channel] (99 pixels: more than one task).
    let x = normal(&[2, 9, 11, 24], 95, 0.0)?;
    let gate = normal(&[2, 24], 96, 0.5)?;
    let rr = normal(&[2, 9, 11, 24], 97, 0.0)?;
    let (yr, gr) = grads(&[&x, &gate], &rr, |t| {
        t[0].broadcast_mul(&t[1].reshape((2, 1, 1, 24))?)
    })?;
    let (y, g) = grads(&[&x, &gate], &rr, |t| nhwc::channel_scale(&t[0], &t[1]))?;
    assert_eq!(bits(&y)?, bits(&yr)?, "channel scale");
    assert_eq!(bits(&g[0])?, bits(&gr[0])?, "channel scale dx");
    // The gate's gradient: 99 products summed in another order than candle's reduce.
    close("channel scale dgate", &g[1], &gr[1], 1e-6)?;
    // add + ReLU, plain and with per-sample drop-path scales (one sample dropped).
    let a = normal(&[4, 5, 6, 8], 92, 0.0)?;
    let b = normal(&[4, 5, 6, 8], 93, 0.0)?;
    let rr = normal(&[4, 5, 6, 8], 94, 0.0)?;
    let (yr, gr) = grads(&[&a, &b], &rr, |t| nhwc::reference::add_relu(&t[0], &t[1]))?;
    let (y, g) = grads(&[&a, &b], &rr, |t| nhwc::add_relu(&t[0], &t[1]))?;
    assert_eq!(bits(&y)?, bits(&yr)?, "add + relu");
    assert_eq!(bits(&g[0])?, bits(&gr[0])?, "add + relu da");
    assert_eq!(bits(&g[1])?, bits(&gr[1])?, "add + relu db");
    let scale = Tensor::new(&[1.25f32, 0.0, 1.25, 1.25], &Device::Cpu)?.reshape((4, 1, 1, 1))?;
    let (ys, saved) = nhwc::add_relu_train(&a, &b, Some(&scale))?;
    let (yrs, grs) = grads(&[&a, &b], &rr, |t| {
        nhwc::reference::add_relu(&t[0].broadcast_mul(&scale)?, &t[1])
    })?;
    assert_eq!(bits(&ys)?, bits(&yrs)?, "scaled add + relu");
    let (da, db) = nhwc::add_relu_backward(&saved, &rr)?;
    // Equal values (a dropped sample's gradient may be -0 on one side and +0 on the other).
    let vals = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(vals(&da), vals(&grs[0]), "scaled add + relu da");
    assert_eq!(vals(&db), vals(&grs[1]), "scaled add + relu db");
    Ok(())
}

/// One training step of a small channels-last ResNet and EfficientNet-B0 (the explicit backward;
/// depthwise convs, SiLU, squeeze-excite) and ViT-Ti (candle's graph with the fused row ops)
/// through the kernels, in rayon pools of 1, 2 and 3 threads: the logits and every gradient are
/// the same bits.
#[test]
fn results_do_not_depend_on_the_thread_count() -> Result<()> {
    use trainer::model::{ActivationLayout, BackwardMode, NetConfig, ResNetConfig};
    let nets: [(NetConfig, usize); 3] = [
        (
            ResNetConfig {
                layers: [1, 1, 1, 1],
                ..ResNetConfig::by_name("resnet50").unwrap()
            }
            .into(),
            48,
        ),
        (NetConfig::by_name("efficientnet_b0").unwrap(), 48),
        (
            NetConfig::by_name("vit_tiny_patch16_224")
                .unwrap()
                .with_img_size(32),
            32,
        ),
    ];
    for (net, size) in nets {
        let step = || -> Result<Vec<Vec<u32>>> {
            let cfg = net.clone().with_num_classes(5).with_drop_path_rate(0.1);
            let vm = candle_nn::VarMap::new();
            let mut m = cfg.build_seeded(&vm, 2, DType::F32, &Device::Cpu)?;
            m.set_layout(ActivationLayout::Nhwc);
            if matches!(net, NetConfig::ResNet(_)) {
                m.set_backward_mode(BackwardMode::Explicit);
            }
            let x = normal(&[3, size, size, 3], 100, 0.0)?;
            let (logits, pass) = m.forward_train_pass(&x, 9)?;
            let g = pass.backward(&logits.sqr()?.sum_all()?)?;
            let mut out = vec![bits(&logits)?];
            for (_, v) in m.trainable_vars()? {
                out.push(bits(g.get(v.as_tensor()).expect("a gradient"))?);
            }
            Ok(out)
        };
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(step)
        };
        let one = run(1)?;
        for t in [2, 3] {
            assert!(run(t)? == one, "{net:?}: {t} threads differ from 1");
        }
    }
    Ok(())
}
