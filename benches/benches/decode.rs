//! Decoding one ImageNet-sized JPEG: libjpeg-turbo and zune-jpeg, full decode and the train
//! crop's region decode.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use loader::decode::{CropRequest, DecodeOptions, Decoder, DecoderKind};
use loader::rng::Rng;
use loader::transform::{rrc_box, RrcConfig};

mod common;

fn decode(c: &mut Criterion) {
    let jpegs = common::jpegs(32);
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(jpegs.len() as u64));
    for kind in [DecoderKind::Turbo, DecoderKind::Zune] {
        let mut d = Decoder::new(kind).unwrap();
        let mut out = Vec::new();
        g.bench_function(format!("{kind:?}/full"), |b| {
            b.iter(|| {
                for j in &jpegs {
                    black_box(
                        d.decode(j, None, DecodeOptions::default(), &mut out)
                            .unwrap(),
                    );
                }
            })
        });
        g.bench_function(format!("{kind:?}/train_crop_224"), |b| {
            let mut rng = Rng::new(1);
            b.iter(|| {
                for j in &jpegs {
                    let (w, h) = d.size(j).unwrap();
                    let (crop, _) = rrc_box(w, h, &RrcConfig::default(), &mut rng);
                    black_box(
                        d.decode(
                            j,
                            Some(CropRequest {
                                crop,
                                size: 224,
                                in_image: false,
                            }),
                            DecodeOptions::default(),
                            &mut out,
                        )
                        .unwrap(),
                    );
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
