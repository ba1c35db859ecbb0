//! The CUDA channels-last ops against their CPU references (f32), on random shapes. These run
//! on a machine with a GPU (`cargo test --features cuda`, or the prebuilt test binary that
//! `scripts/build-cuda.sh` stages); without one each test prints that it was skipped.
//!
//! Tolerances: the GPU computes from bf16 inputs in f32 and rounds its outputs to bf16 (relative
//! step 2^-8 = 0.39 %); the CPU reference gets the same bf16-rounded inputs and computes in f32.
//! So elementwise results may differ by one bf16 rounding, and reductions (convolutions, BN
//! statistics, gradients that are sums over the batch) by that plus f32 summation order. The
//! relative L2 error bound is 1e-2 for outputs and gradients (observed errors are reported), and
//! exact equality where no rounding happens (max-pool forward, its argmax routing).
#![cfg(feature = "cuda")]

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarMap;
use trainer::model::{ActivationLayout, BackwardMode, BatchNorm2d, ResNetConfig};
use trainer::ops::nhwc;

fn gpu() -> Option<Device> {
    match trainer::cuda::device::open(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

/// Relative L2 error of `got` against `want` (both moved to the CPU in f64).
fn rel(got: &Tensor, want: &Tensor) -> Result<f64> {
    let g = got
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?;
    let w = want
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?;
    let num = (&g - &w)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let den = w.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt().max(1e-30);
    Ok(num / den)
}

/// A random bf16 tensor on the GPU and the same values in f32 on the CPU.
fn pair(shape: &[usize], dev: &Device, std: f64) -> Result<(Tensor, Tensor)> {
    let cpu = Tensor::randn(0f32, std as f32, shape, &Device::Cpu)?
        .to_dtype(DType::BF16)?
        .to_dtype(DType::F32)?;
    Ok((cpu.to_device(dev)?.to_dtype(DType::BF16)?, cpu))
}

/// Gradients of `sum(y * r)` for one random `r` (bf16-representable), on the GPU output `yg`
/// and the CPU output `yc`.
fn backward_pair(yg: &Tensor, yc: &Tensor, dev: &Device) -> Result<(GradStore, GradStore)> {
    let (rg, rc) = pair(yc.dims(), dev, 1.0)?;
    let gg = (yg.to_dtype(DType::F32)? * rg.to_dtype(DType::F32)?)?
        .sum_all()?
        .backward()?;
    let gc = (yc * rc)?.sum_all()?.backward()?;
    Ok((gg, gc))
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) -> Result<()> {
    let r = rel(got, want)?;
    eprintln!("{what}: relative error {r:.2e}");
    assert!(r < tol, "{what}: relative error {r:e} above {tol:e}");
    Ok(())
}

#[test]
fn conv2d_matches_cpu() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    // (n, h, w, c, k, r, stride, pad, groups): 3x3, strided 1x1, grouped, the 7x7 stem.
    let cases = [
        (2, 9, 9, 16, 32, 3, 1, 1, 1),
        (3, 8, 8, 32, 64, 1, 2, 0, 1),
        (2, 8, 8, 32, 32, 3, 2, 1, 4),
        (2, 32, 32, 3, 64, 7, 2, 3, 1),
        (4, 7, 7, 64, 24, 3, 1, 1, 1),
    ];
    for (n, h, w, c, k, r, stride, pad, groups) in cases {
        let name = format!("conv {n}x{h}x{w}x{c} -> {k} k{r} s{stride} p{pad} g{groups}");
        let (xg, xc) = pair(&[n, h, w, c], &dev, 1.0)?;
        let wc = Tensor::randn(0f32, 0.1, (k, c / groups, r, r), &Device::Cpu)?
            .to_dtype(DType::BF16)?
            .to_dtype(DType::F32)?;
        let (wvc, wvg) = (
            Var::from_tensor(&wc)?,
            Var::from_tensor(&wc.to_device(&dev)?)?,
        );
        let (xvc, xvg) = (Var::from_tensor(&xc)?, Var::from_tensor(&xg)?);
        let yc = nhwc::conv2d(xvc.as_tensor(), wvc.as_tensor(), stride, pad, groups)?;
        let yg = nhwc::conv2d(xvg.as_tensor(), wvg.as_tensor(), stride, pad, groups)?;
        assert_eq!(yg.dims(), yc.dims(), "{name}");
        assert_close(&format!("{name} forward"), &yg, &yc, 1e-2)?;
        let (gg, gc) = backward_pair(&yg, &yc, &dev)?;
        let dx = gg.get(xvg.as_tensor()).expect("dx");
        assert_close(
            &format!("{name} dx"),
            dx,
            gc.get(xvc.as_tensor()).expect("dx"),
            1e-2,
        )?;
        let dw = gg.get(wvg.as_tensor()).expect("dw");
        assert_eq!(dw.dtype(), DType::F32, "master-weight gradient stays f32");
        assert_close(
            &format!("{name} dw"),
            dw,
            gc.get(wvc.as_tensor()).expect("dw"),
            1e-2,
        )?;
    }
    Ok(())
}

/// One convolution step (forward, both backward passes) of a fixed input on `dev`: output,
/// input gradient and filter gradient, as f32 on the host.
fn conv_step(dev: &Device) -> Result<Vec<Vec<f32>>> {
    let x = Tensor::arange(0f32, (8 * 14 * 14 * 64) as f32, &Device::Cpu)?
        .affine(1e-4, -1.0)?
        .sin()?
        .reshape((8, 14, 14, 64))?;
    let w = Tensor::arange(0f32, (64 * 64 * 9) as f32, &Device::Cpu)?
        .affine(3e-4, 0.5)?
        .cos()?
        .affine(0.05, 0.0)?
        .reshape((64, 64, 3, 3))?;
    let xv = Var::from_tensor(&x.to_device(dev)?.to_dtype(DType::BF16)?)?;
    let wv = Var::from_tensor(&w.to_device(dev)?)?;
    let y = nhwc::conv2d(xv.as_tensor(), wv.as_tensor(), 1, 1, 1)?;
    let g = y.to_dtype(DType::F32)?.sqr()?.sum_all()?.backward()?;
    let flat = |t: &Tensor| -> Result<Vec<f32>> {
        t.to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1()
    };
    Ok(vec![
        flat(&y)?,
        flat(g.get(xv.as_tensor()).expect("dx"))?,
        flat(g.get(wv.as_tensor()).expect("dw"))?,
    ])
}

/// Relative L2 difference of two host vectors.
fn rel_host(u: &[f32], v: &[f32]) -> f64 {
    let num: f64 = u.iter().zip(v).map(|(p, q)| ((p - q) as f64).powi(2)).sum();
    let den: f64 = v.iter().map(|q| (*q as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Every `Device::new_cuda(0)` (and `open(0)`) is a new candle device over the same GPU: a
/// second one, and one opened on another thread, use the same cuDNN state (it used to be tied to
/// the first device and refused every other one) and give the same results.
#[test]
fn the_device_opened_twice_and_on_another_thread() -> Result<()> {
    let Some(first) = gpu() else { return Ok(()) };
    let second = trainer::cuda::device::open(0)?;
    assert!(!first.same_device(&second), "two candle devices");
    let a = conv_step(&first)?;
    let b = conv_step(&second)?;
    let c = std::thread::spawn(|| conv_step(&Device::new_cuda(0)?))
        .join()
        .expect("the thread ran")?;
    let d = conv_step(&first)?;
    for (what, k) in [("y", 0), ("dx", 1), ("dw", 2)] {
        assert!(a[k].iter().all(|v| v.is_finite()), "{what} finite");
        // The same algorithms on the same inputs: equal up to the fastest algorithms' atomics.
        for (other, o) in [
            ("second device", &b),
            ("other thread", &c),
            ("first again", &d),
        ] {
            let r = rel_host(&o[k], &a[k]);
            eprintln!("{what}, {other}: relative difference {r:.2e}");
            assert!(r < 1e-3, "{what}, {other}: relative difference {r:e}");
        }
    }
    Ok(())
}

/// `open` turns cudarc's per-allocation events off and makes the pool keep freed memory.
#[test]
fn open_sets_the_device_up() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let Device::Cuda(d) = &dev else {
        unreachable!("gpu() opens a CUDA device")
    };
    assert!(!d.is_event_tracking(), "event tracking off");
    assert_eq!(
        trainer::cuda::memory::release_threshold(d)?,
        u64::MAX,
        "the pool keeps freed memory"
    );
    let info = trainer::cuda::device::DeviceInfo::of(d)?;
    eprintln!("{info:?}");
    assert!(info.compute_capability.0 >= 7, "{info:?}");
    Ok(())
}

/// Under the deterministic policy two identical convolution steps give identical bits.
#[test]
fn deterministic_algorithms_repeat_bit_for_bit() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    trainer::cuda::conv::set_deterministic(true);
    let a = conv_step(&dev);
    let b = conv_step(&dev);
    trainer::cuda::conv::set_deterministic(false);
    assert_eq!(a?, b?, "two deterministic runs differ");
    let Device::Cuda(d) = &dev else {
        unreachable!("gpu() opens a CUDA device")
    };
    let (searched, from_disk, cache) = trainer::cuda::conv::plan_stats(d);
    eprintln!(
        "cuDNN plans: {searched} searched, {from_disk} from the disk cache ({cache:?}); \
         kernels: {}",
        trainer::cuda::kernels::build_info(d)
    );
    Ok(())
}

fn bn_on(dev: &Device, c: usize) -> Result<BatchNorm2d> {
    let w = Tensor::randn(1f32, 0.2, c, &Device::Cpu)?.to_device(dev)?;
    let b = Tensor::randn(0f32, 0.2, c, &Device::Cpu)?.to_device(dev)?;
    let rm = Tensor::randn(0f32, 0.1, c, &Device::Cpu)?.to_device(dev)?;
    let rv = Tensor::randn(1f32, 0.1, c, &Device::Cpu)?
        .abs()?
        .to_device(dev)?;
    BatchNorm2d::new(
        Var::from_tensor(&w)?.as_tensor().clone(),
        Var::from_tensor(&b)?.as_tensor().clone(),
        &rm,
        &rv,
    )
}

fn bn_copy(src: &BatchNorm2d, dev: &Device) -> Result<BatchNorm2d> {
    BatchNorm2d::new(
        Var::from_tensor(&src.weight().to_device(dev)?)?
            .as_tensor()
            .clone(),
        Var::from_tensor(&src.bias().to_device(dev)?)?
            .as_tensor()
            .clone(),
        &src.running_mean().as_tensor().to_device(dev)?,
        &src.running_var().as_tensor().to_device(dev)?,
    )
}

#[test]
fn batch_norm_matches_cpu() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    for (n, h, w, c, relu, mean) in [
        (4, 7, 9, 64, true, 0.0),
        (2, 5, 5, 256, false, 3.0),
        (8, 14, 14, 96, true, -1.0),
    ] {
        let name = format!("bn {n}x{h}x{w}x{c} relu {relu} mean {mean}");
        let bg = bn_on(&dev, c)?;
        let bc = bn_copy(&bg, &Device::Cpu)?;
        let (xg, xc) = pair(&[n, h, w, c], &dev, 2.0)?;
        let (xg, xc) = (
            (xg.to_dtype(DType::F32)? + mean)?.to_dtype(DType::BF16)?,
            (xc + mean)?,
        );
        let xc = xc.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
        let (xvg, xvc) = (Var::from_tensor(&xg)?, Var::from_tensor(&xc)?);
        let yg = nhwc::batch_norm(xvg.as_tensor(), &bg, true, relu)?;
        let yc = nhwc::batch_norm(xvc.as_tensor(), &bc, true, relu)?;
        assert_close(&format!("{name} forward"), &yg, &yc, 1e-2)?;
        for (what, g, c) in [
            ("running mean", bg.running_mean(), bc.running_mean()),
            ("running var", bg.running_var(), bc.running_var()),
        ] {
            assert_close(
                &format!("{name} {what}"),
                g.as_tensor(),
                c.as_tensor(),
                1e-4,
            )?;
        }
        let (gg, gc) = backward_pair(&yg, &yc, &dev)?;
        assert_close(
            &format!("{name} dx"),
            gg.get(xvg.as_tensor()).expect("dx"),
            gc.get(xvc.as_tensor()).expect("dx"),
            1e-2,
        )?;
        for (what, g, c) in [
            ("dgamma", bg.weight(), bc.weight()),
            ("dbeta", bg.bias(), bc.bias()),
        ] {
            assert_close(
                &format!("{name} {what}"),
                gg.get(g).expect("grad"),
                gc.get(c).expect("grad"),
                1e-2,
            )?;
        }
        let eg = nhwc::batch_norm(&xg, &bg, false, relu)?;
        let ec = nhwc::batch_norm(&xc, &bc, false, relu)?;
        assert_close(&format!("{name} eval"), &eg, &ec, 1e-2)?;
    }
    Ok(())
}

#[test]
fn pooling_and_add_relu_match_cpu() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    for (n, h, w, c) in [(2, 9, 9, 64), (3, 16, 12, 32), (2, 112, 112, 64)] {
        let name = format!("max-pool {n}x{h}x{w}x{c}");
        let (xg, xc) = pair(&[n, h, w, c], &dev, 1.0)?;
        let (xvg, xvc) = (Var::from_tensor(&xg)?, Var::from_tensor(&xc)?);
        let yg = nhwc::max_pool(xvg.as_tensor(), 3, 2, 1)?;
        let yc = nhwc::max_pool(xvc.as_tensor(), 3, 2, 1)?;
        assert_eq!(rel(&yg, &yc)?, 0.0, "{name}: max of bf16 values is exact");
        let (gg, gc) = backward_pair(&yg, &yc, &dev)?;
        assert_close(
            &format!("{name} dx"),
            gg.get(xvg.as_tensor()).expect("dx"),
            gc.get(xvc.as_tensor()).expect("dx"),
            1e-2,
        )?;
    }
    let (xg, xc) = pair(&[4, 7, 7, 256], &dev, 1.0)?;
    let (xvg, xvc) = (Var::from_tensor(&xg)?, Var::from_tensor(&xc)?);
    let (pg, pc) = (
        nhwc::global_avg_pool(xvg.as_tensor())?,
        nhwc::global_avg_pool(xvc.as_tensor())?,
    );
    assert_eq!(pg.dtype(), DType::F32);
    assert_close("avg-pool forward", &pg, &pc, 1e-5)?;
    let r = Tensor::randn(0f32, 1.0, (4, 256), &Device::Cpu)?;
    let gg = (pg * r.to_device(&dev)?)?.sum_all()?.backward()?;
    let gc = (pc * r)?.sum_all()?.backward()?;
    assert_close(
        "avg-pool dx",
        gg.get(xvg.as_tensor()).expect("dx"),
        gc.get(xvc.as_tensor()).expect("dx"),
        1e-2,
    )?;

    let (ag, ac) = pair(&[2, 5, 5, 64], &dev, 1.0)?;
    let (bg, bc) = pair(&[2, 5, 5, 64], &dev, 1.0)?;
    let (avg, avc, bvg, bvc) = (
        Var::from_tensor(&ag)?,
        Var::from_tensor(&ac)?,
        Var::from_tensor(&bg)?,
        Var::from_tensor(&bc)?,
    );
    let yg = nhwc::add_relu(avg.as_tensor(), bvg.as_tensor())?;
    let yc = nhwc::add_relu(avc.as_tensor(), bvc.as_tensor())?;
    assert_close("add+relu forward", &yg, &yc, 1e-2)?;
    let (gg, gc) = backward_pair(&yg, &yc, &dev)?;
    for (vg, vc) in [(&avg, &avc), (&bvg, &bvc)] {
        assert_close(
            "add+relu grad",
            gg.get(vg.as_tensor()).expect("grad"),
            gc.get(vc.as_tensor()).expect("grad"),
            2e-2,
        )?;
    }

    // Channel attention's gate (bf16 on the GPU, f32 on the CPU), both gradients.
    let (xg, xc) = pair(&[3, 6, 5, 40], &dev, 1.0)?;
    let (gg0, gc0) = pair(&[3, 40], &dev, 1.0)?;
    let (xvg, xvc, gvg, gvc) = (
        Var::from_tensor(&xg)?,
        Var::from_tensor(&xc)?,
        Var::from_tensor(&gg0)?,
        Var::from_tensor(&gc0)?,
    );
    let yg = nhwc::channel_scale(xvg.as_tensor(), gvg.as_tensor())?;
    let yc = nhwc::channel_scale(xvc.as_tensor(), gvc.as_tensor())?;
    assert_close("channel scale forward", &yg, &yc, 1e-2)?;
    let (gg, gc) = backward_pair(&yg, &yc, &dev)?;
    for (what, vg, vc) in [("dx", &xvg, &xvc), ("dgate", &gvg, &gvc)] {
        assert_close(
            &format!("channel scale {what}"),
            gg.get(vg.as_tensor()).expect("grad"),
            gc.get(vc.as_tensor()).expect("grad"),
            2e-2,
        )?;
    }

    // SiLU's gradient (the explicit pass's), bf16 kernel against the CPU kernel.
    let (xg, xc) = pair(&[2, 5, 5, 48], &dev, 3.0)?;
    let (dg, dc) = pair(&[2, 5, 5, 48], &dev, 1.0)?;
    assert_close(
        "silu dx",
        &nhwc::silu_backward(&xg, &dg)?,
        &nhwc::silu_backward(&xc, &dc)?,
        1e-2,
    )?;
    Ok(())
}

/// One training step of a small ResNet-50-shaped network, GPU (channels-last bf16, f32 masters)
/// against the CPU (NCHW f32) from the same initial weights: logits and every gradient, with the
/// GPU backward explicit (the default on CUDA) and through candle's graph. bf16 activations
/// through 16 layers compound the rounding, so the bound is 5e-2 relative.
#[test]
fn training_step_matches_cpu() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    for mode in [BackwardMode::Auto, BackwardMode::Graph] {
        step_matches_cpu(&dev, mode)?;
    }
    Ok(())
}

fn step_matches_cpu(dev: &Device, mode: BackwardMode) -> Result<()> {
    let cfg = ResNetConfig {
        layers: [1, 1, 1, 1],
        num_classes: 10,
        ..ResNetConfig::by_name("resnet50").expect("known")
    }
    .with_drop_path_rate(0.1);
    let (vc, vg) = (VarMap::new(), VarMap::new());
    let mc = cfg.build_seeded(&vc, 3, DType::F32, &Device::Cpu)?;
    let mut mg = cfg.build_seeded(&vg, 3, DType::F32, dev)?;
    mg.set_layout(ActivationLayout::Nhwc);
    mg.set_backward_mode(mode);
    for (m, d) in [(&mc, Device::Cpu), (&mg, dev.clone())] {
        for (name, var) in m.trainable_vars()? {
            if name.ends_with("bn3.weight") {
                var.set(&Tensor::full(0.5f32, var.shape(), &d)?)?;
            }
        }
    }
    let x = Tensor::randn(0f32, 1.0, (8, 3, 64, 64), &Device::Cpu)?
        .to_dtype(DType::BF16)?
        .to_dtype(DType::F32)?;
    let xg = x
        .permute((0, 2, 3, 1))?
        .contiguous()?
        .to_device(dev)?
        .to_dtype(DType::BF16)?;
    let lc = mc.forward_train(&x, 11)?;
    let (lg, pass) = mg.forward_train_pass(&xg, 11)?;
    let explicit = pass.is_explicit();
    assert_eq!(
        explicit,
        mode == BackwardMode::Auto,
        "{mode:?} on CUDA bf16"
    );
    assert_close("tiny resnet50 logits", &lg, &lc, 5e-2)?;
    let gc = lc.sqr()?.sum_all()?.backward()?;
    let gg = pass.backward(&lg.sqr()?.sum_all()?)?;
    let mut worst = (0f64, String::new());
    for ((name, a), (_, b)) in mc.trainable_vars()?.iter().zip(mg.trainable_vars()?.iter()) {
        let got = gg.get(b.as_tensor()).expect("grad");
        let want = gc.get(a.as_tensor()).expect("grad");
        assert_eq!(got.dims(), want.dims(), "{name}: gradient shape");
        assert_eq!(got.dtype(), DType::F32, "{name}: gradient dtype");
        let r = rel(got, want)?;
        if r > worst.0 {
            worst = (r, name.clone());
        }
    }
    eprintln!(
        "tiny resnet50 ({} backward): worst gradient relative error {:.2e} ({})",
        if explicit { "explicit" } else { "graph" },
        worst.0,
        worst.1
    );
    assert!(
        worst.0 < 5e-2,
        "gradient of {} off by {:e}",
        worst.1,
        worst.0
    );
    for ((name, a), (_, b)) in mc.running_stats().iter().zip(mg.running_stats().iter()) {
        assert_close(&format!("running stat {name}"), b, a, 2e-2)?;
    }
    Ok(())
}
