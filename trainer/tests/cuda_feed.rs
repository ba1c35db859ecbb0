//! The CUDA feed against its CPU definitions: Mixup/CutMix bytes (`loader::mix::mix_u8_batch`),
//! normalisation (`trainer::feed::Feed`), and the asynchronous upload path end to end.
//! Needs a GPU, except the NVRTC compile test; the others print a message and pass when none is
//! present.
#![cfg(feature = "cuda")]

mod emu;

use candle_core::cuda_backend::WrapErr;
use candle_core::{DType, Device, Result};
use loader::mix::mix_u8_batch;
use loader::Batch;
use trainer::cuda::feed::{mix_u8, normalise_u8, pinned_buffers, CudaUpload};
use trainer::feed::{Feed, Normalization};
use trainer::model::ActivationLayout;
use trainer::transfer::{DynStorage, Upload};

fn gpu() -> Option<candle_core::cuda_backend::CudaDevice> {
    match trainer::cuda::device::open(0) {
        Ok(Device::Cuda(d)) => Some(d),
        Ok(_) => None,
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

fn images(n: usize, size: usize, seed: u64) -> Vec<u8> {
    let mut rng = loader::rng::Rng::new(seed);
    (0..n * size * size * 3)
        .map(|_| rng.below(256) as u8)
        .collect()
}

/// The feed kernels compile with NVRTC (no GPU needed; libnvrtc on the library path).
#[test]
fn nvrtc_compiles_the_feed_kernels() {
    let ptx =
        trainer::cuda::kernels::ptx(trainer::cuda::feed::MODULE).unwrap_or_else(|e| panic!("{e}"));
    for name in ["mix_u8", "feed_nhwc_bf16", "feed_nchw_f32"] {
        assert!(ptx.contains(name), "{name} missing from the PTX");
    }
}

#[test]
fn mix_kernel_gives_the_host_bytes() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let (n, size) = (6, 17);
    let host = images(n, size, 1);
    let src = dev.cuda_stream().clone_htod(&host).w()?;
    for d in emu::mix_draws(size, 12) {
        let mut want = host.clone();
        mix_u8_batch(&mut want, n, size, size, 3, &d);
        let out = mix_u8(&dev, &src, n, size, &d)?;
        let got = dev.cuda_stream().clone_dtoh(&out).w()?;
        assert_eq!(got, want, "{d:?}");
    }
    Ok(())
}

#[test]
fn normalise_kernels_match_the_cpu_feed() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let (n, size) = (4, 9);
    let host = images(n, size, 2);
    let src = dev.cuda_stream().clone_htod(&host).w()?;
    let cpu = Feed::new(&Device::Cpu)?;
    for d in emu::mix_draws(size, 12) {
        let mut mixed = host.clone();
        mix_u8_batch(&mut mixed, n, size, size, 3, &d);
        let want = cpu.images(&mixed, n, size)?; // [n, 3, s, s] f32
        let got = normalise_u8(
            &dev,
            &src,
            n,
            size,
            &d,
            ActivationLayout::Nchw,
            Normalization::IMAGENET,
        )?;
        assert_eq!(got.dims(), &[n, 3, size, size]);
        let (w, g) = (
            want.flatten_all()?.to_vec1::<f32>()?,
            got.flatten_all()?.to_vec1::<f32>()?,
        );
        assert!(
            w.iter().zip(&g).all(|(a, b)| a.to_bits() == b.to_bits()),
            "f32 NCHW differs for {d:?}"
        );
        let want_bf = want
            .permute((0, 2, 3, 1))?
            .contiguous()?
            .to_dtype(DType::BF16)?;
        let got = normalise_u8(
            &dev,
            &src,
            n,
            size,
            &d,
            ActivationLayout::Nhwc,
            Normalization::IMAGENET,
        )?;
        assert_eq!(got.dims(), &[n, size, size, 3]);
        assert_eq!(got.dtype(), DType::BF16);
        let (w, g) = (
            want_bf.flatten_all()?.to_vec1::<half::bf16>()?,
            got.flatten_all()?.to_vec1::<half::bf16>()?,
        );
        assert!(
            w.iter().zip(&g).all(|(a, b)| a.to_bits() == b.to_bits()),
            "bf16 NHWC differs for {d:?}"
        );
    }
    Ok(())
}

#[test]
fn the_async_upload_delivers_every_batch_in_order() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let (n, size) = (8, 32);
    let bytes = n * size * size * 3;
    let cpu = Feed::new(&Device::Cpu)?;
    let mut up = CudaUpload::new(&dev, bytes)?;
    let ds = emu::mix_draws(size, 12);
    let mut want = std::collections::VecDeque::new();
    for (k, d) in ds.iter().enumerate() {
        let host = images(n, size, 100 + k as u64);
        let mut buf = pinned_buffers(&dev, 1, bytes)?.pop().expect("one buffer");
        loader::HostStorage::bytes_mut(&mut buf).copy_from_slice(&host);
        let batch = Batch::detached(k, n, size as u32, vec![0; n], Box::new(buf) as DynStorage);
        up.start(batch, d)?;
        let mut mixed = host;
        mix_u8_batch(&mut mixed, n, size, size, 3, d);
        want.push_back(
            cpu.images(&mixed, n, size)?
                .permute((0, 2, 3, 1))?
                .contiguous()?
                .to_dtype(DType::BF16)?,
        );
        // One batch ahead, as the training loop runs it.
        if up.pending() == 2 {
            let got = up.next_images(ActivationLayout::Nhwc)?;
            let w = want.pop_front().expect("expected batch");
            assert_eq!(
                got.flatten_all()?.to_vec1::<half::bf16>()?,
                w.flatten_all()?.to_vec1::<half::bf16>()?
            );
        }
    }
    while up.pending() > 0 {
        let got = up.next_images(ActivationLayout::Nhwc)?;
        let w = want.pop_front().expect("expected batch");
        assert_eq!(
            got.flatten_all()?.to_vec1::<half::bf16>()?,
            w.flatten_all()?.to_vec1::<half::bf16>()?
        );
    }
    assert!(want.is_empty());
    Ok(())
}
