//! JPEG to RGB8, with libjpeg-turbo's DCT-domain scaling and region-of-interest decoding where
//! they apply, and zune-jpeg (the `image` crate's decoder) as the alternative and fallback.
//!
//! A train sample only needs the pixels of its crop, at a resolution no finer than the output
//! needs. libjpeg-turbo can decode at 1/2, 1/4 or 1/8 of full size (the IDCT computes fewer
//! outputs) and can skip the columns left and right of a region and every row below it. With
//! both, [`Decoder::decode`] does the least work that still gives at least `size` pixels across
//! the crop in each direction, so the resize that follows only ever downsamples, as it would
//! from the full image. The fidelity cost against full decode + crop + resize is measured by
//! `loader-bench --fidelity` (see the README).

use crate::transform::CropBox;

/// Which JPEG decoder to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecoderKind {
    /// libjpeg-turbo 3 (TurboJPEG API): scaling and region decoding. The default when built
    /// with the `turbojpeg` feature (on by default).
    Turbo,
    /// zune-jpeg: pure Rust, full decode only.
    Zune,
}

impl DecoderKind {
    /// The fastest decoder compiled in (measured: see the README's loader figures).
    pub fn fastest() -> Self {
        if cfg!(feature = "turbojpeg") {
            DecoderKind::Turbo
        } else {
            DecoderKind::Zune
        }
    }
}

impl std::str::FromStr for DecoderKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "turbo" if cfg!(feature = "turbojpeg") => Ok(DecoderKind::Turbo),
            "turbo" => Err("decoder \"turbo\" needs the loader's turbojpeg feature".into()),
            "zune" => Ok(DecoderKind::Zune),
            _ => Err(format!("unknown decoder {s:?}: expected turbo or zune")),
        }
    }
}

/// Decoding shortcuts allowed for a crop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Decode at M/8 of full size when the crop stays at least `size` pixels wide and high.
    pub dct_scaling: bool,
    /// Decode only the columns and rows the crop needs.
    pub region: bool,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            dct_scaling: true,
            region: true,
        }
    }
}

/// The part of an image a sample needs: its crop, the output size it will be resized to, and
/// whether the resize reads pixels around the crop ([`crate::sample::CropMode::InImage`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CropRequest {
    /// The crop in full-size source pixels.
    pub crop: CropBox,
    /// Output side in pixels.
    pub size: u32,
    /// The resize filter reads beyond the crop (eval): decode its reach around the crop too.
    pub in_image: bool,
}

/// What [`Decoder::decode`] put in the output buffer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodedRegion {
    /// Width of the decoded pixels (RGB8, rows packed).
    pub width: u32,
    /// Height of the decoded pixels.
    pub height: u32,
    /// The requested crop, in the decoded pixels' coordinates.
    pub crop: CropBox,
    /// The scale the image was decoded at: `scale_num / 8`.
    pub scale_num: u32,
}

/// A decoder with its reusable state; one per worker thread.
pub struct Decoder {
    kind: DecoderKind,
    #[cfg(feature = "turbojpeg")]
    turbo: Option<turbo::Turbo>,
}

/// The most pixels an image may have: PIL's `Image.MAX_IMAGE_PIXELS` doubled, the size at which
/// PIL (and so timm's loader) refuses an image as a decompression bomb. A header's size is
/// checked against it before any pixel buffer is allocated: a 1 KB file can claim
/// 65500 x 65500 pixels (12.9 GB as RGB). ImageNet's largest image has 0.2 % of it.
pub const MAX_IMAGE_PIXELS: u64 = 2 * 89_478_485;

/// `width` x `height` if it is at most [`MAX_IMAGE_PIXELS`], else the error naming the limit.
pub fn check_image_size(width: u32, height: u32) -> Result<(), String> {
    let pixels = width as u64 * height as u64;
    if pixels > MAX_IMAGE_PIXELS {
        return Err(format!(
            "JPEG of {width} x {height} pixels ({pixels}) is larger than the limit of \
             {MAX_IMAGE_PIXELS} pixels (PIL's decompression-bomb limit; corrupt header?)"
        ));
    }
    Ok(())
}

/// Image size from the JPEG headers, or an error saying why the bytes are not a usable JPEG.
pub fn jpeg_size(bytes: &[u8]) -> Result<(u32, u32), String> {
    let mut d = zune_jpeg::JpegDecoder::new_with_options(
        zune_jpeg::zune_core::bytestream::ZCursor::new(bytes),
        zune_options(),
    );
    d.decode_headers()
        .map_err(|e| format!("bad JPEG header: {e}"))?;
    let (w, h) = d.dimensions().ok_or("bad JPEG header: no frame size")?;
    Ok((w as u32, h as u32))
}

/// The smallest M of M/8 in {1, 2, 4, 8} (1/8, 1/4, 1/2, full size) at which `crop` keeps at
/// least `size` pixels in both directions. libjpeg-turbo also offers 3/8, 5/8, 3/4 and 7/8, but
/// its IDCTs for those have no SIMD code and decode slower than full size (measured: the train
/// transform at 224 fell from 1,526 to 1,409 images/s per core with them).
pub fn scale_for(crop: &CropBox, size: u32) -> u32 {
    [1, 2, 4, 8]
        .into_iter()
        .find(|&m| {
            let s = m as f64 / 8.0;
            crop.width * s >= size as f64 && crop.height * s >= size as f64
        })
        .unwrap_or(8)
}

impl Decoder {
    /// A decoder of `kind`.
    pub fn new(kind: DecoderKind) -> Result<Self, String> {
        Ok(Decoder {
            kind,
            #[cfg(feature = "turbojpeg")]
            turbo: match kind {
                DecoderKind::Turbo => Some(turbo::Turbo::new()?),
                DecoderKind::Zune => None,
            },
        })
    }

    /// The decoder kind.
    pub fn kind(&self) -> DecoderKind {
        self.kind
    }

    /// Image size from the headers.
    pub fn size(&mut self, bytes: &[u8]) -> Result<(u32, u32), String> {
        #[cfg(feature = "turbojpeg")]
        if let Some(t) = &mut self.turbo {
            match t.header(bytes) {
                Ok(h) => return Ok((h.width, h.height)),
                Err(turbo::TurboError::Failed(e)) => return Err(e),
                Err(turbo::TurboError::Unsupported) => {}
            }
        }
        jpeg_size(bytes)
    }

    /// Decodes `bytes` to RGB8 in `out` (resized as needed): the whole image, or, given `crop`
    /// and the output `size`, as little of it as covers the crop at no less than `size` pixels
    /// across. CMYK JPEGs, which libjpeg-turbo will not convert to RGB, go to zune-jpeg; any
    /// other libjpeg-turbo error is returned (libjpeg-turbo warnings, such as extra bytes after
    /// the image, are not errors).
    pub fn decode(
        &mut self,
        bytes: &[u8],
        crop: Option<CropRequest>,
        opts: DecodeOptions,
        out: &mut Vec<u8>,
    ) -> Result<DecodedRegion, String> {
        #[cfg(feature = "turbojpeg")]
        if let Some(t) = &mut self.turbo {
            match t.decode(bytes, crop, opts, out) {
                Ok(r) => return Ok(r),
                Err(turbo::TurboError::Failed(e)) => return Err(e),
                // CMYK: libjpeg-turbo will not convert it to RGB; zune-jpeg does.
                Err(turbo::TurboError::Unsupported) => {}
            }
        }
        let _ = opts;
        decode_zune(bytes, crop.map(|c| c.crop), out)
    }
}

/// zune-jpeg's options: RGB out, and any size a JPEG can state (zune's default stops at 16384
/// per side; [`MAX_IMAGE_PIXELS`] is the limit that applies).
fn zune_options() -> zune_jpeg::zune_core::options::DecoderOptions {
    zune_jpeg::zune_core::options::DecoderOptions::default()
        .jpeg_set_out_colorspace(zune_jpeg::zune_core::colorspace::ColorSpace::RGB)
        .set_max_width(1 << 16)
        .set_max_height(1 << 16)
}

fn decode_zune(
    bytes: &[u8],
    crop: Option<CropBox>,
    out: &mut Vec<u8>,
) -> Result<DecodedRegion, String> {
    let mut d = zune_jpeg::JpegDecoder::new_with_options(
        zune_jpeg::zune_core::bytestream::ZCursor::new(bytes),
        zune_options(),
    );
    d.decode_headers()
        .map_err(|e| format!("cannot decode JPEG: {e}"))?;
    let (w, h) = d.dimensions().ok_or("cannot decode JPEG: no frame size")?;
    check_image_size(w as u32, h as u32)?;
    let channels = d.output_colorspace().map_or(3, |c| c.num_components());
    out.resize(w * h * channels, 0);
    // zune-jpeg 0.5.15 panics on some malformed files (an unwrap in its AVX2 IDCT on a CMYK
    // file with odd sampling factors: a fuzzing finding, fuzz/regressions/jpeg_zune/); a bad
    // file must be an error for the sample policy, not a dead worker.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| d.decode_into(out)))
        .map_err(|_| "cannot decode JPEG: zune-jpeg failed on a malformed file".to_owned())?
        .map_err(|e| format!("cannot decode JPEG: {e}"))?;
    if channels == 1 {
        // Greyscale: expand in place, back to front.
        out.resize(w * h * 3, 0);
        for i in (0..w * h).rev() {
            let v = out[i];
            out[3 * i..3 * i + 3].fill(v);
        }
    } else if channels != 3 {
        return Err(format!("cannot decode JPEG: {channels} output channels"));
    }
    let (w, h) = (w as u32, h as u32);
    Ok(DecodedRegion {
        width: w,
        height: h,
        crop: crop.unwrap_or(CropBox {
            left: 0.0,
            top: 0.0,
            width: w as f64,
            height: h as f64,
        }),
        scale_num: 8,
    })
}

#[cfg(feature = "turbojpeg")]
mod turbo {
    //! A minimal safe wrapper over the TurboJPEG 3 API, for what the `turbojpeg` crate does not
    //! expose: decoding a cropping region (`tj3SetCroppingRegion`).

    use std::ffi::CStr;
    use std::ptr::NonNull;

    use turbojpeg_sys as raw;

    use super::{scale_for, CropRequest, DecodeOptions, DecodedRegion};
    use crate::transform::CropBox;

    pub struct Turbo {
        handle: NonNull<std::ffi::c_void>,
        /// The image whose header the handle holds (address and length of its bytes), so
        /// that `size` followed by `decode` parses the header once.
        current: Option<(usize, usize, Header)>,
    }

    // SAFETY: a TurboJPEG handle holds no thread-local state; it may move between threads as
    // long as one thread uses it at a time, which `&mut self` on every call guarantees.
    unsafe impl Send for Turbo {}

    pub enum TurboError {
        /// A JPEG libjpeg-turbo cannot turn into RGB (CMYK, YCCK).
        Unsupported,
        /// Anything else, with libjpeg-turbo's message.
        Failed(String),
    }

    #[derive(Clone, Copy)]
    pub struct Header {
        pub width: u32,
        pub height: u32,
        subsamp: i32,
    }

    /// iMCU width per subsampling (turbojpeg.h `tjMCUWidth`).
    const MCU_WIDTH: [u32; 7] = [8, 16, 16, 8, 8, 32, 8];

    impl Turbo {
        pub fn new() -> Result<Self, String> {
            // SAFETY: tj3Init has no preconditions; it returns null on failure.
            let h = unsafe { raw::tj3Init(raw::TJINIT_TJINIT_DECOMPRESS as i32) };
            NonNull::new(h)
                .map(|handle| Turbo {
                    handle,
                    current: None,
                })
                .ok_or_else(|| "cannot initialise libjpeg-turbo".to_owned())
        }

        fn error(&self) -> TurboError {
            // SAFETY: the handle is valid; tj3GetErrorStr returns a NUL-terminated string owned
            // by the handle (or a static one), valid until the next call on it.
            let s = unsafe { CStr::from_ptr(raw::tj3GetErrorStr(self.handle.as_ptr())) };
            TurboError::Failed(format!("cannot decode JPEG: {}", s.to_string_lossy()))
        }

        fn check(&self, rc: i32) -> Result<(), TurboError> {
            // SAFETY: valid handle.
            let code = unsafe { raw::tj3GetErrorCode(self.handle.as_ptr()) };
            if rc == 0 || code == raw::TJERR_TJERR_WARNING as i32 {
                Ok(())
            } else {
                Err(self.error())
            }
        }

        fn get(&self, param: raw::TJPARAM) -> i32 {
            // SAFETY: valid handle, valid parameter id.
            unsafe { raw::tj3Get(self.handle.as_ptr(), param as i32) }
        }

        pub fn header(&mut self, bytes: &[u8]) -> Result<Header, TurboError> {
            let id = (bytes.as_ptr() as usize, bytes.len());
            if let Some((p, n, h)) = self.current {
                if (p, n) == id {
                    return Ok(h);
                }
            }
            self.current = None;
            // SAFETY: the pointer and length describe `bytes`, which outlives the call.
            let rc = unsafe {
                raw::tj3DecompressHeader(self.handle.as_ptr(), bytes.as_ptr(), bytes.len() as _)
            };
            self.check(rc)?;
            let colorspace = self.get(raw::TJPARAM_TJPARAM_COLORSPACE);
            if colorspace == raw::TJCS_TJCS_CMYK as i32 || colorspace == raw::TJCS_TJCS_YCCK as i32
            {
                return Err(TurboError::Unsupported);
            }
            let h = Header {
                width: self.get(raw::TJPARAM_TJPARAM_JPEGWIDTH) as u32,
                height: self.get(raw::TJPARAM_TJPARAM_JPEGHEIGHT) as u32,
                subsamp: self.get(raw::TJPARAM_TJPARAM_SUBSAMP),
            };
            self.current = Some((id.0, id.1, h));
            Ok(h)
        }

        pub fn decode(
            &mut self,
            bytes: &[u8],
            crop: Option<CropRequest>,
            opts: DecodeOptions,
            out: &mut Vec<u8>,
        ) -> Result<DecodedRegion, TurboError> {
            let h = self.header(bytes)?;
            // Before any allocation: the pixel buffer below is sized from the header.
            super::check_image_size(h.width, h.height).map_err(TurboError::Failed)?;
            let m = match crop {
                Some(r) if opts.dct_scaling => scale_for(&r.crop, r.size),
                _ => 8,
            };
            // libjpeg-turbo lists its factors in lowest terms (1/1, 3/4, 1/2, ...).
            let g = [8u32, 4, 2, 1]
                .into_iter()
                .find(|g| m % g == 0)
                .unwrap_or(1);
            let sf = raw::tjscalingfactor {
                num: (m / g) as i32,
                denom: (8 / g) as i32,
            };
            // SAFETY: valid handle; the factor is one of libjpeg-turbo's supported M/8.
            self.check(unsafe { raw::tj3SetScalingFactor(self.handle.as_ptr(), sf) })?;
            let scaled = |v: u32| (v * m).div_ceil(8);
            let (sw, sh) = (scaled(h.width), scaled(h.height));
            let s = m as f64 / 8.0;
            // The region: the crop scaled, rounded outwards, left edge aligned to the scaled iMCU.
            let (x0, y0, x1, y1) = match crop {
                Some(CropRequest {
                    crop: c,
                    size,
                    in_image,
                }) if opts.region => {
                    let mcu = MCU_WIDTH
                        .get(h.subsamp as usize)
                        .map_or(8, |&w| (w * m).div_ceil(8));
                    // A margin around the crop, so that pixels near its edges come out as in a
                    // full decode: 4 pixels for the chroma upsampling (which treats a region's
                    // edge as the image's edge and reads one chroma sample beyond), plus, when
                    // the resize reads around the crop, the filter's reach (bicubic support:
                    // 2 source pixels per output pixel when downscaling).
                    let reach = if in_image {
                        2.0 * (c.width / size as f64).max(1.0) + 4.0
                    } else {
                        4.0
                    };
                    let margin = reach * s;
                    let x0 =
                        (((c.left * s) - margin).max(0.0).floor() as u32).min(sw.saturating_sub(1));
                    let x0 = x0 / mcu * mcu;
                    let y0 =
                        (((c.top * s) - margin).max(0.0).floor() as u32).min(sh.saturating_sub(1));
                    let x1 = (((c.left + c.width) * s + margin).ceil() as u32).clamp(x0 + 1, sw);
                    let y1 = (((c.top + c.height) * s + margin).ceil() as u32).clamp(y0 + 1, sh);
                    (x0, y0, x1, y1)
                }
                _ => (0, 0, sw, sh),
            };
            let region = raw::tjregion {
                x: x0 as i32,
                y: y0 as i32,
                w: (x1 - x0) as i32,
                h: (y1 - y0) as i32,
            };
            let whole = (x0, y0, x1, y1) == (0, 0, sw, sh);
            let region = if whole {
                raw::tjregion {
                    x: 0,
                    y: 0,
                    w: 0,
                    h: 0,
                }
            } else {
                region
            };
            // SAFETY: valid handle; the region lies inside the scaled image with its left edge
            // on an iMCU boundary, as tj3SetCroppingRegion requires (it checks and fails if not).
            self.check(unsafe { raw::tj3SetCroppingRegion(self.handle.as_ptr(), region) })?;
            let (w, ht) = (x1 - x0, y1 - y0);
            // With a cropping region, tj3Decompress8 writes rows of the region's width. At most
            // MAX_IMAGE_PIXELS * 3 bytes, so neither this product nor the pitch overflows.
            out.resize(w as usize * ht as usize * 3, 0);
            // SAFETY: `out` holds w * ht * 3 bytes: ht rows of pitch w * 3, exactly what a
            // decode of the region (or whole scaled image) to packed RGB writes.
            let rc = unsafe {
                raw::tj3Decompress8(
                    self.handle.as_ptr(),
                    bytes.as_ptr(),
                    bytes.len() as _,
                    out.as_mut_ptr(),
                    (w * 3) as i32,
                    raw::TJPF_TJPF_RGB,
                )
            };
            // The next image needs its own header, even if it reuses this memory.
            self.current = None;
            self.check(rc)?;
            let crop = match crop {
                Some(CropRequest { crop: c, .. }) => CropBox {
                    left: c.left * s - x0 as f64,
                    top: c.top * s - y0 as f64,
                    width: c.width * s,
                    height: c.height * s,
                },
                None => CropBox {
                    left: 0.0,
                    top: 0.0,
                    width: w as f64,
                    height: ht as f64,
                },
            };
            Ok(DecodedRegion {
                width: w,
                height: ht,
                crop,
                scale_num: m,
            })
        }
    }

    impl Drop for Turbo {
        fn drop(&mut self) {
            // SAFETY: the handle came from tj3Init and is destroyed once.
            unsafe { raw::tj3Destroy(self.handle.as_ptr()) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 16 x 8 baseline JPEG whose frame header is then patched to claim `width` x `height`.
    fn jpeg_claiming(width: u16, height: u16) -> Vec<u8> {
        let pixels: Vec<u8> = (0..16 * 8 * 3).map(|i| (i * 7 % 256) as u8).collect();
        let mut out = Vec::new();
        jpeg_encoder::Encoder::new(&mut out, 90)
            .encode(&pixels, 16, 8, jpeg_encoder::ColorType::Rgb)
            .unwrap();
        let sof = out.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        out[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
        out[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
        out
    }

    /// Found while writing the fuzz targets: a 1 KB file claiming 65500 x 65500 made both
    /// decoders allocate 12.9 GB, and the libjpeg-turbo path computed its buffer size in u32 (an overflow panic,
    /// or in release a 4 GB buffer for a 12.9 GB decode).
    #[test]
    fn a_header_claiming_a_huge_image_is_refused_before_allocating() {
        // 65500: libjpeg-turbo's largest side (JPEG_MAX_DIMENSION).
        let bomb = jpeg_claiming(65500, 65500);
        let kinds = [Some(DecoderKind::Zune), "turbo".parse().ok()];
        for kind in kinds.into_iter().flatten() {
            let mut d = Decoder::new(kind).unwrap();
            assert_eq!(d.size(&bomb).unwrap(), (65500, 65500), "{kind:?}");
            let mut out = Vec::new();
            let err = d
                .decode(&bomb, None, DecodeOptions::default(), &mut out)
                .unwrap_err();
            assert_eq!(
                err,
                "JPEG of 65500 x 65500 pixels (4290250000) is larger than the limit of \
                 178956970 pixels (PIL's decompression-bomb limit; corrupt header?)",
                "{kind:?}"
            );
            assert_eq!(out.capacity(), 0, "{kind:?}");
            // The same file at its true size decodes.
            let ok = jpeg_claiming(16, 8);
            let r = d
                .decode(&ok, None, DecodeOptions::default(), &mut out)
                .unwrap();
            assert_eq!(
                (r.width, r.height, out.len()),
                (16, 8, 16 * 8 * 3),
                "{kind:?}"
            );
        }
        assert!(check_image_size(17_895_697, 10).is_ok());
    }

    #[test]
    fn a_zune_panic_on_a_malformed_file_is_an_error() {
        // Found by fuzzing jpeg_turbo (CMYK goes to zune-jpeg): its AVX2 IDCT unwrapped None.
        let bad = include_bytes!("../../fuzz/regressions/jpeg_zune/cmyk-zune-idct-panic.jpg");
        let kinds = [Some(DecoderKind::Zune), "turbo".parse().ok()];
        for kind in kinds.into_iter().flatten() {
            let mut out = Vec::new();
            let r =
                Decoder::new(kind)
                    .unwrap()
                    .decode(bad, None, DecodeOptions::default(), &mut out);
            // An error on machines whose zune-jpeg takes the AVX2 path, else whatever the
            // scalar path makes of it; never a panic.
            if let Err(e) = r {
                assert!(e.starts_with("cannot decode JPEG"), "{kind:?}: {e}");
            }
        }
        assert!(check_image_size(17_895_697, 11).is_err());
    }
}
