fn main() {
    let bytes = std::fs::read(std::env::args().nth(1).unwrap()).unwrap();
    let mut d = loader::decode::Decoder::new(loader::DecoderKind::Turbo).unwrap();
    let mut out = Vec::new();
    let r = d.decode(&bytes, None, Default::default(), &mut out);
    println!("{:?}", r);
    let c = loader::transform::CropBox { left: 100.0, top: 50.0, width: 300.0, height: 300.0 };
    let r = d.decode(&bytes, Some((c, 224)), Default::default(), &mut out);
    println!("{:?}", r);
}
