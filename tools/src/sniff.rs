//! Identifying an image file from its first bytes and its JPEG headers, without decoding it.
//!
//! This is what keeps `shard-imagenet`'s stored-bytes path at file-copy speed: a JPEG's frame
//! header gives its size, component count (1 grey, 3 YCbCr, 4 CMYK/YCCK) and coding process,
//! and the end-of-image marker tells a complete file from a truncated one.

/// What a file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A JPEG whose headers parse.
    Jpeg(JpegInfo),
    /// A PNG (any extension).
    Png,
}

/// Facts from a JPEG's headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JpegInfo {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Colour components: 1 greyscale, 3 YCbCr (or RGB), 4 CMYK or YCCK.
    pub components: u8,
    /// Progressive (SOF2/SOF6/SOF10/SOF14) rather than sequential.
    pub progressive: bool,
    /// The transform flag of an Adobe APP14 segment, if present.
    pub adobe_transform: Option<u8>,
}

/// Identifies `bytes`, or says why it cannot be stored.
pub fn sniff(bytes: &[u8]) -> Result<Kind, String> {
    if bytes.is_empty() {
        return Err("empty file".into());
    }
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Ok(Kind::Png);
    }
    if bytes.starts_with(&[0xFF, 0xD8]) {
        return sniff_jpeg(bytes).map(Kind::Jpeg);
    }
    let head: String = bytes[..bytes.len().min(8)]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Err(format!("not a JPEG or PNG file (starts with bytes {head})"))
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn sniff_jpeg(b: &[u8]) -> Result<JpegInfo, String> {
    let mut pos = 2;
    let mut frame: Option<JpegInfo> = None;
    let mut adobe_transform = None;
    loop {
        // Find the next marker: 0xFF, any fill bytes 0xFF, then the marker code.
        if pos >= b.len() {
            return Err(format!(
                "truncated JPEG: headers end at byte {pos} before the image data"
            ));
        }
        if b[pos] != 0xFF {
            return Err(format!(
                "corrupt JPEG: expected a marker at byte {pos}, found 0x{:02x}",
                b[pos]
            ));
        }
        while pos < b.len() && b[pos] == 0xFF {
            pos += 1;
        }
        let Some(&marker) = b.get(pos) else {
            return Err("truncated JPEG: file ends inside a marker".into());
        };
        pos += 1;
        match marker {
            0x01 | 0xD0..=0xD7 => continue,
            0xD9 => return Err("corrupt JPEG: end-of-image marker before any image data".into()),
            _ => {}
        }
        if pos + 2 > b.len() {
            return Err(format!(
                "truncated JPEG: segment 0x{marker:02x} has no length"
            ));
        }
        let len = be16(b, pos) as usize;
        if len < 2 || pos + len > b.len() {
            return Err(format!(
                "truncated JPEG: segment 0x{marker:02x} at byte {} claims {len} bytes, {} remain",
                pos - 2,
                b.len() - pos
            ));
        }
        let seg = &b[pos + 2..pos + len];
        match marker {
            // Start of frame (all coding processes except DHT 0xC4, JPG 0xC8, DAC 0xCC).
            0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC) => {
                if seg.len() < 6 {
                    return Err("corrupt JPEG: frame header too short".into());
                }
                if matches!(marker, 0xC3 | 0xC7 | 0xCB | 0xCF) {
                    return Err(format!(
                        "unsupported JPEG: lossless coding (SOF 0x{marker:02x})"
                    ));
                }
                let height = be16(seg, 1) as u32;
                let width = be16(seg, 3) as u32;
                let components = seg[5];
                if width == 0 || height == 0 {
                    return Err(format!(
                        "unsupported JPEG: frame size {width}x{height} (height from a DNL marker is not supported)"
                    ));
                }
                if !matches!(components, 1 | 3 | 4) {
                    return Err(format!("unsupported JPEG: {components} colour components"));
                }
                // What the loader would refuse is refused here, before it is stored (or, for
                // CMYK, decoded: a 1 KB header can claim 65535 x 65535).
                loader::decode::check_image_size(width, height)
                    .map_err(|e| format!("unsupported JPEG: {e}"))?;
                frame = Some(JpegInfo {
                    width,
                    height,
                    components,
                    progressive: matches!(marker, 0xC2 | 0xC6 | 0xCA | 0xCE),
                    adobe_transform: None,
                });
            }
            0xEE if seg.len() >= 12 && seg.starts_with(b"Adobe") => {
                adobe_transform = Some(seg[11]);
            }
            0xDA => {
                let Some(mut info) = frame else {
                    return Err("corrupt JPEG: image data before the frame header".into());
                };
                info.adobe_transform = adobe_transform;
                // The entropy-coded data cannot contain FF D9 (a 0xFF data byte is stuffed as
                // FF 00), so the end-of-image marker after the first scan proves the file is
                // whole. Trailing bytes after it (some cameras append data) are allowed.
                let scan = &b[pos + len..];
                if !scan.windows(2).rev().any(|w| w == [0xFF, 0xD9]) {
                    return Err(format!(
                        "truncated JPEG: no end-of-image marker after the image data ({} bytes)",
                        b.len()
                    ));
                }
                return Ok(info);
            }
            _ => {}
        }
        pos += len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg(components: u8, progressive: bool) -> Vec<u8> {
        let (w, h) = (33u16, 17u16);
        let ct = match components {
            1 => jpeg_encoder::ColorType::Luma,
            3 => jpeg_encoder::ColorType::Rgb,
            _ => jpeg_encoder::ColorType::Cmyk,
        };
        let pixels: Vec<u8> = (0..w as usize * h as usize * components as usize)
            .map(|i| (i * 37 % 251) as u8)
            .collect();
        let mut out = Vec::new();
        let mut enc = jpeg_encoder::Encoder::new(&mut out, 90);
        enc.set_progressive(progressive);
        enc.encode(&pixels, w, h, ct).unwrap();
        out
    }

    #[test]
    fn identifies_jpeg_kinds() {
        for (c, p) in [(1, false), (3, false), (3, true), (4, false)] {
            let Kind::Jpeg(info) = sniff(&jpeg(c, p)).unwrap() else {
                panic!("not a jpeg")
            };
            assert_eq!((info.width, info.height), (33, 17));
            assert_eq!(info.components, c);
            assert_eq!(info.progressive, p);
        }
    }

    #[test]
    fn rejects_truncated_and_foreign_files() {
        let j = jpeg(3, false);
        let e = sniff(&j[..j.len() * 8 / 10]).unwrap_err();
        assert!(
            e.starts_with("truncated JPEG: no end-of-image marker"),
            "{e}"
        );
        let e = sniff(&j[..20]).unwrap_err();
        assert!(e.starts_with("truncated JPEG"), "{e}");
        assert_eq!(
            sniff(b"GIF89a..").unwrap_err(),
            "not a JPEG or PNG file (starts with bytes 4749463839612e2e)"
        );
        assert_eq!(sniff(b"").unwrap_err(), "empty file");
        // A header claiming more pixels than the loader decodes is refused (prompted by a
        // fuzzing hang: 1.3 KB claiming 65535 x 1535 took seconds in `convert::decode`).
        let mut big = j.clone();
        let sof = big.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        big[sof + 5..sof + 9].copy_from_slice(&[0x40, 0x00, 0xff, 0xff]);
        assert_eq!(
            sniff(&big).unwrap_err(),
            "unsupported JPEG: JPEG of 65535 x 16384 pixels (1073725440) is larger than the \
             limit of 178956970 pixels (PIL's decompression-bomb limit; corrupt header?)"
        );
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\nrest").unwrap(), Kind::Png);
    }
}
