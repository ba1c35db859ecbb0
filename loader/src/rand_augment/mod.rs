//! RandAugment as timm v0.5.4 builds it from a config string (`timm/data/auto_augment.py`).
//!
//! `rand-m7-mstd0.5-inc1` (RSB A1/A2) means: per image, draw `n` = 2 ops uniformly with
//! replacement from the 15-op "increasing" list; apply each with probability 0.5, at a
//! magnitude drawn from N(7, 0.5) and clipped to [0, 10]; signed ops flip their sign with
//! probability 1/2; geometric ops fill with the ImageNet mean (124, 116, 104) and resample
//! bilinear, bicubic or a random one of the two per call. All draws come from the sample's
//! generator ([`crate::rng::sample_rng`]), so the result does not depend on the thread.
//!
//! [`RandAugment::apply_op`] runs one op deterministically (given magnitude, sign and filter),
//! for tests and tools; [`ops`] has the pixel operations themselves.

pub mod ops;

use std::cell::RefCell;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::rng::Rng;
use crate::sample::Augment;
use crate::transform::{Interpolation, TrainInterpolation};
use ops::Enhance;

/// One RandAugment operation, by timm's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Per-channel stretch to the full range.
    AutoContrast,
    /// Per-channel histogram equalisation.
    Equalize,
    /// `255 - v`.
    Invert,
    /// Rotation about the centre by ±30·m/10 degrees.
    Rotate,
    /// Keep `int(4·m/10)` bits (stronger at low magnitude).
    Posterize,
    /// Keep `4 - int(4·m/10)` bits.
    PosterizeIncreasing,
    /// Invert values ≥ `int(256·m/10)`.
    Solarize,
    /// Invert values ≥ `256 - int(256·m/10)`.
    SolarizeIncreasing,
    /// Add `int(110·m/10)` to values below 128.
    SolarizeAdd,
    /// Saturation, factor `1.8·m/10 + 0.1`.
    Color,
    /// Saturation, factor `max(0.1, 1 ± 0.9·m/10)`.
    ColorIncreasing,
    /// Contrast, factor `1.8·m/10 + 0.1`.
    Contrast,
    /// Contrast, factor `max(0.1, 1 ± 0.9·m/10)`.
    ContrastIncreasing,
    /// Brightness, factor `1.8·m/10 + 0.1`.
    Brightness,
    /// Brightness, factor `max(0.1, 1 ± 0.9·m/10)`.
    BrightnessIncreasing,
    /// Sharpness, factor `1.8·m/10 + 0.1`.
    Sharpness,
    /// Sharpness, factor `max(0.1, 1 ± 0.9·m/10)`.
    SharpnessIncreasing,
    /// Horizontal shear, factor ±0.3·m/10 (not centred: row y shifts by factor·(y + 0.5)).
    ShearX,
    /// Vertical shear, factor ±0.3·m/10.
    ShearY,
    /// Horizontal shift by ±0.45·m/10 of the width.
    TranslateXRel,
    /// Vertical shift by ±0.45·m/10 of the height.
    TranslateYRel,
}

impl Op {
    /// Every op, in timm's `NAME_TO_OP` order of the RandAugment names.
    pub const ALL: [Op; 21] = [
        Op::AutoContrast,
        Op::Equalize,
        Op::Invert,
        Op::Rotate,
        Op::Posterize,
        Op::PosterizeIncreasing,
        Op::Solarize,
        Op::SolarizeIncreasing,
        Op::SolarizeAdd,
        Op::Color,
        Op::ColorIncreasing,
        Op::Contrast,
        Op::ContrastIncreasing,
        Op::Brightness,
        Op::BrightnessIncreasing,
        Op::Sharpness,
        Op::SharpnessIncreasing,
        Op::ShearX,
        Op::ShearY,
        Op::TranslateXRel,
        Op::TranslateYRel,
    ];

    /// timm's `_RAND_INCREASING_TRANSFORMS` (used with `inc1`, as in every RSB recipe).
    pub const INCREASING: [Op; 15] = [
        Op::AutoContrast,
        Op::Equalize,
        Op::Invert,
        Op::Rotate,
        Op::PosterizeIncreasing,
        Op::SolarizeIncreasing,
        Op::SolarizeAdd,
        Op::ColorIncreasing,
        Op::ContrastIncreasing,
        Op::BrightnessIncreasing,
        Op::SharpnessIncreasing,
        Op::ShearX,
        Op::ShearY,
        Op::TranslateXRel,
        Op::TranslateYRel,
    ];

    /// timm's `_RAND_TRANSFORMS` (without `inc`).
    pub const PLAIN: [Op; 15] = [
        Op::AutoContrast,
        Op::Equalize,
        Op::Invert,
        Op::Rotate,
        Op::Posterize,
        Op::Solarize,
        Op::SolarizeAdd,
        Op::Color,
        Op::Contrast,
        Op::Brightness,
        Op::Sharpness,
        Op::ShearX,
        Op::ShearY,
        Op::TranslateXRel,
        Op::TranslateYRel,
    ];

    /// timm's name of the op.
    pub fn name(self) -> &'static str {
        match self {
            Op::AutoContrast => "AutoContrast",
            Op::Equalize => "Equalize",
            Op::Invert => "Invert",
            Op::Rotate => "Rotate",
            Op::Posterize => "Posterize",
            Op::PosterizeIncreasing => "PosterizeIncreasing",
            Op::Solarize => "Solarize",
            Op::SolarizeIncreasing => "SolarizeIncreasing",
            Op::SolarizeAdd => "SolarizeAdd",
            Op::Color => "Color",
            Op::ColorIncreasing => "ColorIncreasing",
            Op::Contrast => "Contrast",
            Op::ContrastIncreasing => "ContrastIncreasing",
            Op::Brightness => "Brightness",
            Op::BrightnessIncreasing => "BrightnessIncreasing",
            Op::Sharpness => "Sharpness",
            Op::SharpnessIncreasing => "SharpnessIncreasing",
            Op::ShearX => "ShearX",
            Op::ShearY => "ShearY",
            Op::TranslateXRel => "TranslateXRel",
            Op::TranslateYRel => "TranslateYRel",
        }
    }

    /// Whether the op's argument takes a random sign (timm's `_randomly_negate`).
    pub fn is_signed(self) -> bool {
        matches!(
            self,
            Op::Rotate
                | Op::ColorIncreasing
                | Op::ContrastIncreasing
                | Op::BrightnessIncreasing
                | Op::SharpnessIncreasing
                | Op::ShearX
                | Op::ShearY
                | Op::TranslateXRel
                | Op::TranslateYRel
        )
    }

    /// Whether the op resamples (and so uses the interpolation and the fill colour).
    pub fn is_geometric(self) -> bool {
        matches!(
            self,
            Op::Rotate | Op::ShearX | Op::ShearY | Op::TranslateXRel | Op::TranslateYRel
        )
    }

    /// The op's argument at `magnitude` (already clipped), negated if `negate` and the op is
    /// signed: timm's `LEVEL_TO_ARG` with `translate_pct` 0.45.
    pub fn arg(self, magnitude: f64, negate: bool) -> OpArg {
        let level = magnitude / 10.0;
        let sign = |v: f64| if negate && self.is_signed() { -v } else { v };
        let enhance = || level * 1.8 + 0.1;
        let enhance_increasing = || (1.0 + sign(level * 0.9)).max(0.1);
        match self {
            Op::AutoContrast | Op::Equalize | Op::Invert => OpArg::None,
            Op::Rotate => OpArg::Degrees(sign(level * 30.0)),
            Op::Posterize => OpArg::Bits((level * 4.0) as i64),
            Op::PosterizeIncreasing => OpArg::Bits(4 - (level * 4.0) as i64),
            Op::Solarize => OpArg::Threshold((level * 256.0) as i64),
            Op::SolarizeIncreasing => OpArg::Threshold(256 - (level * 256.0) as i64),
            Op::SolarizeAdd => OpArg::Add((level * 110.0) as i64),
            Op::Color | Op::Contrast | Op::Brightness | Op::Sharpness => OpArg::Factor(enhance()),
            Op::ColorIncreasing
            | Op::ContrastIncreasing
            | Op::BrightnessIncreasing
            | Op::SharpnessIncreasing => OpArg::Factor(enhance_increasing()),
            Op::ShearX | Op::ShearY => OpArg::Shear(sign(level * 0.3)),
            Op::TranslateXRel | Op::TranslateYRel => OpArg::Fraction(sign(level * 0.45)),
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Op {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Op::ALL
            .iter()
            .copied()
            .find(|op| op.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let names: Vec<&str> = Op::ALL.iter().map(|o| o.name()).collect();
                format!(
                    "unknown RandAugment op {s:?}: expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// The argument an op runs with (timm's `level_args`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OpArg {
    /// No argument.
    None,
    /// Rotation angle in degrees (counter-clockwise, as PIL).
    Degrees(f64),
    /// Bits kept by posterize (negative behaves as 0).
    Bits(i64),
    /// Solarize threshold.
    Threshold(i64),
    /// Value added by SolarizeAdd.
    Add(i64),
    /// Enhancement factor.
    Factor(f64),
    /// Shear factor.
    Shear(f64),
    /// Translation as a fraction of the width or height.
    Fraction(f64),
}

/// The most ops per image (`n`) a config may ask for. timm sets no limit, but every op runs on
/// every image, so `rand-n999999999` made each sample hang (a fuzzing finding).
pub const MAX_NUM_LAYERS: usize = 32;

/// Parsed RandAugment settings (timm's config string plus the hparams the train transform
/// passes: fill colour and interpolation).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RandAugmentConfig {
    /// Mean magnitude `M` (`m`), on timm's 0..10 scale.
    pub magnitude: f64,
    /// Ops per image (`n`, default 2).
    pub num_layers: usize,
    /// Standard deviation of the magnitude (`mstd`); `f64::INFINITY` draws it uniformly from
    /// [0, M] (timm's `mstd` > 100); 0 keeps it fixed.
    pub magnitude_std: f64,
    /// Upper clip of the magnitude (`mmax`, default 10).
    pub magnitude_max: f64,
    /// The "increasing" op list (`inc1`).
    pub increasing: bool,
    /// Probability of applying each drawn op (timm: 0.5).
    pub prob: f64,
    /// Fill colour of geometric ops: timm's `img_mean`, round(255 · ImageNet mean).
    pub fill: [u8; 3],
    /// Filter of geometric ops (timm passes the train interpolation; `random` picks one per
    /// call).
    pub interpolation: TrainInterpolation,
}

impl RandAugmentConfig {
    /// Parses timm's `rand-m{M}[-n{N}][-mstd{S}][-mmax{X}][-inc1]`. Unknown sections are errors
    /// naming the section (timm ignores sections without a digit and asserts on unknown
    /// keys). `inc0` is rejected: timm v0.5.4 tests the string, so `inc0` would still select
    /// the increasing list; leave `inc` out for the plain list.
    pub fn parse(config: &str) -> Result<Self, String> {
        let mut parts = config.split('-');
        if parts.next() != Some("rand") {
            return Err(format!(
                "RandAugment config {config:?} must start with \"rand\" (e.g. rand-m7-mstd0.5-inc1)"
            ));
        }
        let mut c = RandAugmentConfig {
            magnitude: 10.0,
            num_layers: 2,
            magnitude_std: 0.0,
            magnitude_max: 10.0,
            increasing: false,
            prob: 0.5,
            fill: IMAGENET_FILL,
            interpolation: TrainInterpolation::Random,
        };
        for part in parts {
            let split = part
                .find(|ch: char| ch.is_ascii_digit())
                .unwrap_or(part.len());
            let (key, val) = part.split_at(split);
            let bad =
                |what: &str| format!("RandAugment config {config:?}: section {part:?}: {what}");
            if val.is_empty() {
                return Err(bad(
                    "expected a key followed by a number (m, n, mstd, mmax, inc)",
                ));
            }
            let int = || val.parse::<u32>().map_err(|_| bad("expected an integer"));
            match key {
                "m" => c.magnitude = int()? as f64,
                "n" => {
                    c.num_layers = int()? as usize;
                    if c.num_layers > MAX_NUM_LAYERS {
                        return Err(bad(&format!(
                            "at most {MAX_NUM_LAYERS} ops per image (timm's recipes use 2 or 3)"
                        )));
                    }
                }
                "mstd" => {
                    let s: f64 = val.parse().map_err(|_| bad("expected a number"))?;
                    c.magnitude_std = if s > 100.0 { f64::INFINITY } else { s };
                }
                "mmax" => c.magnitude_max = int()? as f64,
                "inc" => match val {
                    "1" => c.increasing = true,
                    _ => {
                        return Err(bad(
                            "only inc1 is accepted (timm treats any inc value as on); omit it for the plain op list",
                        ))
                    }
                },
                "w" => return Err(bad("weighted op choice (w) is not supported")),
                _ => return Err(bad(&format!("unknown key {key:?}: expected m, n, mstd, mmax or inc"))),
            }
        }
        Ok(c)
    }

    /// The op list the config draws from.
    pub fn ops(&self) -> &'static [Op] {
        if self.increasing {
            &Op::INCREASING
        } else {
            &Op::PLAIN
        }
    }
}

impl FromStr for RandAugmentConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        RandAugmentConfig::parse(s)
    }
}

/// timm's `img_mean` fill: `round(255 · (0.485, 0.456, 0.406))`.
pub const IMAGENET_FILL: [u8; 3] = [124, 116, 104];

/// One op as drawn for an image: what [`RandAugment::apply`] does, step by step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OpDraw {
    /// The op.
    pub op: Op,
    /// Its magnitude after clipping.
    pub magnitude: f64,
    /// Whether a signed op's argument was negated.
    pub negate: bool,
    /// The filter (geometric ops).
    pub interpolation: Interpolation,
}

/// The RandAugment transform: plugs into the loader as an [`Augment`].
#[derive(Clone, Debug)]
pub struct RandAugment {
    config: RandAugmentConfig,
}

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl RandAugment {
    /// The transform for `config`.
    pub fn new(config: RandAugmentConfig) -> Self {
        RandAugment { config }
    }

    /// Parses a timm config string (see [`RandAugmentConfig::parse`]).
    pub fn from_config_str(config: &str) -> Result<Self, String> {
        Ok(RandAugment::new(RandAugmentConfig::parse(config)?))
    }

    /// Its settings.
    pub fn config(&self) -> &RandAugmentConfig {
        &self.config
    }

    /// Draws the ops for one image: for each layer an op, whether it applies (skipped ops
    /// are `None`), its magnitude, sign and filter.
    pub fn draw(&self, rng: &mut Rng) -> Vec<Option<OpDraw>> {
        (0..self.config.num_layers)
            .map(|_| self.draw_layer(rng))
            .collect()
    }

    /// One layer's draw (see [`RandAugment::draw`]).
    fn draw_layer(&self, rng: &mut Rng) -> Option<OpDraw> {
        let c = &self.config;
        let list = c.ops();
        let op = list[rng.below(list.len() as u64) as usize];
        // timm: `if self.prob < 1.0 and random.random() > self.prob: return img`.
        if c.prob < 1.0 && rng.f64() > c.prob {
            return None;
        }
        let m = if c.magnitude_std == f64::INFINITY {
            rng.uniform(0.0, c.magnitude)
        } else if c.magnitude_std > 0.0 {
            c.magnitude + c.magnitude_std * rng.normal()
        } else {
            c.magnitude
        };
        let magnitude = m.min(c.magnitude_max).max(0.0);
        // `_randomly_negate`: negative when random() > 0.5.
        let negate = op.is_signed() && rng.f64() > 0.5;
        let interpolation = match c.interpolation {
            TrainInterpolation::Bilinear => Interpolation::Bilinear,
            TrainInterpolation::Bicubic => Interpolation::Bicubic,
            TrainInterpolation::Random if op.is_geometric() => {
                if rng.below(2) == 0 {
                    Interpolation::Bilinear
                } else {
                    Interpolation::Bicubic
                }
            }
            TrainInterpolation::Random => Interpolation::Bilinear,
        };
        Some(OpDraw {
            op,
            magnitude,
            negate,
            interpolation,
        })
    }

    /// Runs one op on `img` (RGB8, `width` x `height`) with the given magnitude, sign and
    /// filter, filling uncovered pixels with `fill`.
    pub fn apply_op(draw: &OpDraw, fill: [u8; 3], img: &mut [u8], width: usize, height: usize) {
        SCRATCH.with(|s| {
            let mut scratch = s.borrow_mut();
            apply_arg(
                draw.op,
                draw.op.arg(draw.magnitude, draw.negate),
                draw.interpolation,
                fill,
                img,
                width,
                height,
                &mut scratch,
            )
        })
    }
}

/// Runs `op` with argument `arg` (as [`Op::arg`] gives it) on `img`.
#[allow(clippy::too_many_arguments)]
pub fn apply_arg(
    op: Op,
    arg: OpArg,
    interpolation: Interpolation,
    fill: [u8; 3],
    img: &mut [u8],
    width: usize,
    height: usize,
    scratch: &mut Vec<u8>,
) {
    assert_eq!(
        img.len(),
        width * height * 3,
        "image is not {width}x{height} RGB"
    );
    if op.is_geometric() {
        if let Some(m) = op_matrix(op, arg, width, height) {
            scratch.clear();
            scratch.extend_from_slice(img);
            ops::affine(scratch, img, width, height, m, interpolation, fill);
        }
        return;
    }
    match (op, arg) {
        (Op::AutoContrast, _) => ops::auto_contrast(img),
        (Op::Equalize, _) => ops::equalize(img),
        (Op::Invert, _) => ops::invert(img),
        (_, OpArg::Bits(bits)) => ops::posterize(img, bits.max(0) as u32),
        (_, OpArg::Threshold(t)) => ops::solarize(img, t.max(0) as u32),
        (_, OpArg::Add(add)) => ops::solarize_add(img, add.max(0) as u32, 128),
        (Op::Color | Op::ColorIncreasing, OpArg::Factor(f)) => {
            ops::enhance(img, width, height, Enhance::Color, f, scratch)
        }
        (Op::Contrast | Op::ContrastIncreasing, OpArg::Factor(f)) => {
            ops::enhance(img, width, height, Enhance::Contrast, f, scratch)
        }
        (Op::Brightness | Op::BrightnessIncreasing, OpArg::Factor(f)) => {
            ops::enhance(img, width, height, Enhance::Brightness, f, scratch)
        }
        (Op::Sharpness | Op::SharpnessIncreasing, OpArg::Factor(f)) => {
            ops::enhance(img, width, height, Enhance::Sharpness, f, scratch)
        }
        (op, arg) => unreachable!("{op} never takes {arg:?}"),
    }
}

/// The affine matrix (output to input, Pillow's convention) of a geometric op with its
/// argument, or `None` when it leaves the image as it is (a rotation by 0) or the op is not
/// geometric. timm: shear `(1, f, 0, 0, 1, 0)` / `(1, 0, 0, f, 1, 0)` (not centred),
/// translate `(1, 0, p·W, 0, 1, 0)` / `(1, 0, 0, 0, 1, p·H)`, rotate about the centre.
pub fn op_matrix(op: Op, arg: OpArg, width: usize, height: usize) -> Option<ops::AffineMatrix> {
    match (op, arg) {
        (Op::Rotate, OpArg::Degrees(d)) => ops::rotate_matrix(d, width, height),
        (Op::ShearX, OpArg::Shear(f)) => Some([1.0, f, 0.0, 0.0, 1.0, 0.0]),
        (Op::ShearY, OpArg::Shear(f)) => Some([1.0, 0.0, 0.0, f, 1.0, 0.0]),
        (Op::TranslateXRel, OpArg::Fraction(p)) => {
            Some([1.0, 0.0, p * width as f64, 0.0, 1.0, 0.0])
        }
        (Op::TranslateYRel, OpArg::Fraction(p)) => {
            Some([1.0, 0.0, 0.0, 0.0, 1.0, p * height as f64])
        }
        _ => None,
    }
}

impl Augment for RandAugment {
    fn apply(&self, image: &mut [u8], size: u32, rng: &mut Rng) {
        let size = size as usize;
        // Layer by layer, as `draw` orders the draws, without collecting them.
        for _ in 0..self.config.num_layers {
            if let Some(d) = self.draw_layer(rng) {
                RandAugment::apply_op(&d, self.config.fill, image, size, size);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_rsb_strings() {
        let a2 = RandAugmentConfig::parse("rand-m7-mstd0.5-inc1").unwrap();
        assert_eq!(a2.magnitude, 7.0);
        assert_eq!(a2.num_layers, 2);
        assert_eq!(a2.magnitude_std, 0.5);
        assert_eq!(a2.magnitude_max, 10.0);
        assert!(a2.increasing);
        assert_eq!(a2.ops().len(), 15);
        let g = RandAugmentConfig::parse("rand-m9-n3-mstd101-mmax12").unwrap();
        assert_eq!((g.magnitude, g.num_layers, g.magnitude_max), (9.0, 3, 12.0));
        assert!(g.magnitude_std.is_infinite());
        assert!(!g.increasing);
    }

    #[test]
    fn bad_strings_name_the_section() {
        for (s, needle) in [
            ("rand-m7-foo3", "\"foo3\""),
            ("rand-m7-inc0", "inc0"),
            ("rand-mx", "\"mx\""),
            ("rand-m7.5", "\"m7.5\""),
            ("auto-m7", "must start"),
            // Fuzzing finding (fuzz/regressions/rand_augment/): a billion ops per image.
            (
                "rand-m9-n999999999",
                "\"n999999999\": at most 32 ops per image",
            ),
        ] {
            let e = RandAugmentConfig::parse(s).unwrap_err();
            assert!(e.contains(needle), "{s}: {e}");
        }
    }

    #[test]
    fn level_to_arg_matches_timm() {
        assert_eq!(Op::Rotate.arg(7.0, true), OpArg::Degrees(-21.0));
        assert_eq!(Op::PosterizeIncreasing.arg(7.0, false), OpArg::Bits(2));
        assert_eq!(Op::SolarizeIncreasing.arg(7.0, false), OpArg::Threshold(77));
        assert_eq!(Op::SolarizeAdd.arg(7.0, false), OpArg::Add(77));
        assert_eq!(Op::ContrastIncreasing.arg(10.0, true), OpArg::Factor(0.1));
        let OpArg::Factor(f) = Op::Color.arg(5.0, true) else {
            panic!()
        };
        assert!((f - 1.0).abs() < 1e-12);
    }

    #[test]
    fn draws_are_deterministic_and_respect_the_config() {
        let ra = RandAugment::from_config_str("rand-m7-mstd0.5-inc1").unwrap();
        let mut applied = 0;
        for i in 0..2000 {
            let a = ra.draw(&mut Rng::new(i));
            assert_eq!(a, ra.draw(&mut Rng::new(i)));
            assert_eq!(a.len(), 2);
            for d in a.into_iter().flatten() {
                applied += 1;
                assert!(Op::INCREASING.contains(&d.op));
                assert!((0.0..=10.0).contains(&d.magnitude));
            }
        }
        // Each of 4,000 draws applies with p = 0.5.
        assert!((1800..2200).contains(&applied), "{applied}");
    }
}
