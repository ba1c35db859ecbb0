//! Crop + resize of a decoded ImageNet-sized image to 224 and 160, bilinear and bicubic.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use loader::decode::{DecodeOptions, Decoder, DecoderKind};
use loader::sample::{resize_into, CropMode};
use loader::transform::{CropBox, Interpolation};

mod common;

fn crop_resize(c: &mut Criterion) {
    let jpeg = &common::jpegs(1)[0];
    let mut d = Decoder::new(DecoderKind::fastest()).unwrap();
    let mut px = Vec::new();
    let r = d
        .decode(jpeg, None, DecodeOptions::default(), &mut px)
        .unwrap();
    // A typical RandomResizedCrop: about half the image area.
    let crop = CropBox {
        left: 20.0,
        top: 10.0,
        width: (r.width as f64 * 0.7).floor(),
        height: (r.height as f64 * 0.7).floor(),
    };
    let mut resizer = fast_image_resize::Resizer::new();
    let mut g = c.benchmark_group("crop_resize");
    g.throughput(Throughput::Elements(1));
    for size in [224u32, 160] {
        let mut out = vec![0u8; (size * size * 3) as usize];
        for interp in [Interpolation::Bilinear, Interpolation::Bicubic] {
            g.bench_function(format!("{interp:?}/{size}"), |b| {
                b.iter(|| {
                    resize_into(
                        &mut resizer,
                        &px,
                        (r.width, r.height),
                        crop,
                        CropMode::Isolated,
                        interp,
                        size,
                        &mut out,
                    )
                    .unwrap();
                    black_box(&out);
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, crop_resize);
criterion_main!(benches);
