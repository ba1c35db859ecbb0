//! The few places where pixels are touched while sharding: decoding the files that cannot be
//! stored as they are (CMYK JPEGs, PNGs), shrinking images above `--max-side`, and encoding the
//! result as a baseline 4:2:0 JPEG.

use fast_image_resize as fr;

/// A decoded image, 8 bits per sample, rows top to bottom, interleaved channels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pixels {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// 1 (grey) or 3 (RGB).
    pub channels: u8,
    /// `width * height * channels` bytes.
    pub data: Vec<u8>,
}

/// Decodes a JPEG or PNG to greyscale (if the file has no colour) or RGB, dropping any alpha
/// channel as PIL's `convert('RGB')` does. CMYK and YCCK JPEGs (Adobe-inverted, as Photoshop
/// writes them) come out as RGB.
pub fn decode(bytes: &[u8]) -> Result<Pixels, String> {
    let img = image::load_from_memory(bytes).map_err(|e| format!("cannot decode: {e}"))?;
    let (width, height) = (img.width(), img.height());
    let (channels, data) = if img.color().has_color() {
        (3, img.into_rgb8().into_raw())
    } else {
        (1, img.into_luma8().into_raw())
    };
    Ok(Pixels {
        width,
        height,
        channels,
        data,
    })
}

/// Encodes as a baseline JPEG at `quality`, chroma subsampled 4:2:0 (PIL's default), greyscale
/// images as single-component JPEGs.
pub fn encode_jpeg(img: &Pixels, quality: u8) -> Result<Vec<u8>, String> {
    let (w, h) = (
        u16::try_from(img.width).map_err(|_| format!("width {} too large for JPEG", img.width))?,
        u16::try_from(img.height)
            .map_err(|_| format!("height {} too large for JPEG", img.height))?,
    );
    let mut out = Vec::with_capacity(img.data.len() / 8);
    let mut enc = jpeg_encoder::Encoder::new(&mut out, quality);
    enc.set_sampling_factor(jpeg_encoder::SamplingFactor::F_2_2);
    let color = if img.channels == 1 {
        jpeg_encoder::ColorType::Luma
    } else {
        jpeg_encoder::ColorType::Rgb
    };
    enc.encode(&img.data, w, h, color)
        .map_err(|e| format!("cannot encode JPEG: {e}"))?;
    Ok(out)
}

/// Size after shrinking `(width, height)` so that the longer side is `max_side`, keeping the
/// aspect ratio (rounded, at least 1 pixel). Unchanged if it already fits.
pub fn fit_size(width: u32, height: u32, max_side: u32) -> (u32, u32) {
    let long = width.max(height);
    if long <= max_side {
        return (width, height);
    }
    let scale = max_side as f64 / long as f64;
    let fit = |v: u32| ((v as f64 * scale).round() as u32).clamp(1, max_side);
    (fit(width), fit(height))
}

/// Resizes to `width` x `height` with an antialiased Lanczos-3 filter (PIL's `LANCZOS`).
pub fn resize(img: &Pixels, width: u32, height: u32) -> Result<Pixels, String> {
    let whole = (0.0, 0.0, img.width as f64, img.height as f64);
    resize_crop(img, whole, width, height)
}

/// Crops the box `(left, top, width, height)` (fractional pixels allowed) and resizes it to
/// `width` x `height` in one pass, with an antialiased Lanczos-3 filter.
pub fn resize_crop(
    img: &Pixels,
    crop: (f64, f64, f64, f64),
    width: u32,
    height: u32,
) -> Result<Pixels, String> {
    let pixel_type = if img.channels == 1 {
        fr::PixelType::U8
    } else {
        fr::PixelType::U8x3
    };
    let src = fr::images::ImageRef::new(img.width, img.height, &img.data, pixel_type)
        .map_err(|e| format!("resize source: {e}"))?;
    let mut dst = fr::images::Image::new(width, height, pixel_type);
    fr::Resizer::new()
        .resize(
            &src,
            &mut dst,
            &fr::ResizeOptions::new()
                .crop(crop.0, crop.1, crop.2, crop.3)
                .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Lanczos3)),
        )
        .map_err(|e| format!("resize: {e}"))?;
    Ok(Pixels {
        width,
        height,
        channels: img.channels,
        data: dst.into_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_size_keeps_aspect() {
        assert_eq!(fit_size(1000, 750, 500), (500, 375));
        assert_eq!(fit_size(300, 2000, 500), (75, 500));
        assert_eq!(fit_size(400, 300, 500), (400, 300));
        assert_eq!(fit_size(5000, 2, 500), (500, 1));
    }

    #[test]
    fn cmyk_jpeg_decodes_to_the_right_colour() {
        // Adobe-style CMYK of RGB (200, 60, 30): k = 1 - max, c = (1 - r - k) / (1 - k), ...
        let rgb = [200u8, 60, 30];
        let k = 255 - *rgb.iter().max().unwrap();
        let ch = |v: u8| ((255 - v - k) as u32 * 255 / (255 - k) as u32) as u8;
        let cmyk = [ch(rgb[0]), ch(rgb[1]), ch(rgb[2]), k];
        let pixels: Vec<u8> = cmyk.iter().copied().cycle().take(32 * 32 * 4).collect();
        let mut jpeg = Vec::new();
        jpeg_encoder::Encoder::new(&mut jpeg, 95)
            .encode(&pixels, 32, 32, jpeg_encoder::ColorType::Cmyk)
            .unwrap();
        let img = decode(&jpeg).unwrap();
        assert_eq!((img.width, img.height, img.channels), (32, 32, 3));
        for (got, want) in img.data[..3].iter().zip(rgb) {
            assert!(got.abs_diff(want) <= 4, "{:?} vs {rgb:?}", &img.data[..3]);
        }
    }

    #[test]
    fn encode_then_decode_round_trips_closely() {
        let data: Vec<u8> = (0..64 * 48 * 3).map(|i| (i / 3 % 64 * 4) as u8).collect();
        let img = Pixels {
            width: 64,
            height: 48,
            channels: 3,
            data,
        };
        let back = decode(&encode_jpeg(&img, 95).unwrap()).unwrap();
        assert_eq!((back.width, back.height, back.channels), (64, 48, 3));
        let mean_err: f64 = img
            .data
            .iter()
            .zip(&back.data)
            .map(|(a, b)| a.abs_diff(*b) as f64)
            .sum::<f64>()
            / img.data.len() as f64;
        assert!(mean_err < 2.0, "mean abs error {mean_err}");
        let small = resize(&img, 32, 24).unwrap();
        assert_eq!(small.data.len(), 32 * 24 * 3);
    }
}
