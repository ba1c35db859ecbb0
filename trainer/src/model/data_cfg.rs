//! Each model's data settings as timm 0.5.4's `default_cfg` gives them (`input_size`,
//! `test_input_size`, `crop_pct`, `interpolation`): what timm's `train.py` and `validate.py` use
//! for that model when no `--img-size`, `--crop-pct` or `--interpolation` is passed
//! (`resolve_data_config`). `train --model-data` applies them to a recipe.
//!
//! These are timm's per-model defaults, not the resolutions of the RSB paper's Table 3 (which this
//! project has no source for): they are the values a timm user gets by naming the model.
//! `trainer/tests/golden/resnet_golden.py` writes them from timm's registry into
//! `model_data.json`, and `trainer/tests/resnet_golden.rs` checks this table against it.

use crate::recipe::{DataConfig, Interpolation};

/// One model's data defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TimmDataCfg {
    /// `input_size`: the training crop.
    pub train_size_px: u32,
    /// `test_input_size` where timm sets one, else `input_size`.
    pub test_size_px: u32,
    /// `crop_pct`.
    pub crop_pct: f64,
    /// `interpolation` (timm's evaluation resize).
    pub interpolation: Interpolation,
}

impl TimmDataCfg {
    /// `data` with these sizes, crop and evaluation interpolation (the training interpolation,
    /// timm's `--train-interpolation`, is the recipe's).
    pub fn apply(&self, data: &mut DataConfig) {
        data.train_size_px = self.train_size_px;
        data.test_size_px = self.test_size_px;
        data.crop_pct = self.crop_pct;
        data.test_interpolation = self.interpolation;
    }
}

/// timm 0.5.4's `default_cfgs[name]` data settings, for every name the trainer knows.
pub fn timm_data_cfg(name: &str) -> Option<TimmDataCfg> {
    use Interpolation::{Bicubic, Bilinear};
    let (train, test, crop, interpolation) = match name {
        // resnet.py
        "resnet18" | "resnet34" => (224, 224, 0.875, Bilinear),
        "resnet50" | "resnet101" | "resnet152" | "resnext50_32x4d" => (224, 224, 0.95, Bicubic),
        "resnet50d" | "seresnet50" | "senet154" => (224, 224, 0.875, Bicubic),
        "ecaresnet50t" => (256, 320, 0.95, Bicubic),
        "ecaresnet269d" => (320, 352, 1.0, Bicubic),
        // regnet.py
        "regnety_002" | "regnety_040" | "regnety_080" | "regnety_320" => (224, 224, 0.875, Bicubic),
        "regnety_160" => (224, 288, 1.0, Bicubic),
        // efficientnet.py
        "efficientnet_b0" => (224, 224, 0.875, Bicubic),
        "efficientnet_b1" => (224, 256, 1.0, Bicubic),
        "efficientnet_b2" => (256, 288, 1.0, Bicubic),
        "efficientnet_b3" => (288, 320, 1.0, Bicubic),
        "efficientnet_b4" => (320, 384, 1.0, Bicubic),
        "efficientnetv2_rw_s" => (288, 384, 1.0, Bicubic),
        "efficientnetv2_rw_m" => (320, 416, 1.0, Bicubic),
        // vision_transformer.py
        "vit_tiny_patch16_224" | "vit_small_patch16_224" | "vit_base_patch16_224" => {
            (224, 224, 0.9, Bicubic)
        }
        _ => return None,
    };
    Some(TimmDataCfg {
        train_size_px: train,
        test_size_px: test,
        crop_pct: crop,
        interpolation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_model_name_has_data_defaults() {
        for name in crate::model::model_names() {
            assert!(timm_data_cfg(name).is_some(), "{name}");
        }
        assert!(timm_data_cfg("resnet51").is_none());
    }

    #[test]
    fn apply_sets_sizes_crop_and_eval_interpolation_only() {
        let mut r = crate::recipe::Recipe::a3();
        let before = r.data.train_interpolation;
        timm_data_cfg("efficientnet_b4").unwrap().apply(&mut r.data);
        assert_eq!((r.data.train_size_px, r.data.test_size_px), (320, 384));
        assert_eq!(r.data.crop_pct, 1.0);
        assert_eq!(r.data.test_interpolation, Interpolation::Bicubic);
        assert_eq!(r.data.train_interpolation, before);
        assert!(r.validate().is_ok());
    }
}
