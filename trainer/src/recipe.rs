//! Training recipes: one typed [`Recipe`], the RSB presets `a1`/`a2`/`a3` and the fine-tuning
//! preset `ft` ([`Recipe::ft`]), TOML round trips and `--set key=value` overrides.
//!
//! Precedence (STYLE B3): preset < `--config run.toml` < typed flags < `--set`. A config file may
//! be partial ([`Recipe::merged_with_toml_str`]); both it and `--set` overrides
//! ([`Recipe::with_overrides`]) are applied to the `toml::Value` tree of the recipe before it is
//! deserialised, so an unknown key or a value of the wrong type is an error that names the key.
//! A complete recipe file ([`Recipe::from_toml_str`]) is read with `#[serde(deny_unknown_fields)]`,
//! which rejects stray keys such as `bn_wd = 0`.
//!
//! Sources cited per field: "T1" = the RSB paper's Table 1 (arXiv 2110.00476) as transcribed in
//! `shared/reference/timm-semantics.md` §1.1; "§1.2" = the timm-level knobs table there; "v0.5.4"
//! = timm v0.5.4 `train.py` defaults. Values the reference marks **unverified** say so.
//!
//! # Choices made for unverified values
//!
//! * `schedule.cooldown_epochs = 0`: timm v0.5.4 defaults to 10 cooldown epochs at `min_lr`, and
//!   whether the RSB runs passed `--cooldown-epochs 0` is unverified. 0 is chosen so that a run
//!   lasts exactly the paper's 600/300/100 epochs (Table 1 and the reported training cost count
//!   those), as the independent mmpretrain reproduction (within 0.3 pt) does, and as the one
//!   RSB-style timm script found does. Set 10 to get timm's default tail.
//! * `augment.smoothing`: 0.1 for A1, 0 for A2/A3 (the per-recipe split is recalled, unverified).
//!   With BCE and `target_threshold = 0.2` smoothing only moves the threshold (§2.5).
//! * `data.train_interpolation = random` (timm v0.5.4 default; the RSB value is unverified,
//!   mmpretrain uses bicubic).
//! * `optim.lr_scaling = sqrt` with `reference_batch = 2048`: at the paper's batch of 2048 every
//!   rule gives the paper's LR; for other batches the square-root rule is what timm HEAD applies to
//!   LAMB. It is explicit here, never inferred from the optimizer name.
//! * `run.micro_batch = 256`: the device batch (and so the BatchNorm batch); the paper used 512
//!   per GPU. Not a paper value; pick what fits the device.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::loss::{BinaryCrossEntropy, TrainLoss};
use crate::optim::{LambConfig, SgdConfig};
use crate::schedule::{CosineWithWarmup, Granularity};

/// Errors of recipe parsing, overriding and validation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RecipeError {
    /// `Recipe::preset` got an unknown name.
    #[error("unknown preset {name:?}; known presets: {}", known.join(", "))]
    UnknownPreset {
        /// The requested name.
        name: String,
        /// The known presets.
        known: &'static [&'static str],
    },
    /// A `--set` argument without `=` or with an empty key.
    #[error("--set {arg:?}: expected key=value, e.g. optim.lr=3.5e-3")]
    MalformedOverride {
        /// The argument as given.
        arg: String,
    },
    /// A `--set` or config key that names no recipe field.
    #[error("{origin} {key}: unknown key; known keys here: {}", known.join(", "))]
    UnknownKey {
        /// Where the key came from: `--set` or a config file.
        origin: String,
        /// The dotted key.
        key: String,
        /// The keys of the innermost table that exists.
        known: Vec<String>,
    },
    /// A `--set` or config value whose TOML type differs from the field's.
    #[error("{origin} {key}: expected {expected}, found {found} `{value}`")]
    TypeMismatch {
        /// Where the value came from: `--set` or a config file.
        origin: String,
        /// The dotted key.
        key: String,
        /// The field's TOML type.
        expected: String,
        /// The given value's TOML type.
        found: String,
        /// The given value.
        value: String,
    },
    /// The TOML text or tree could not be turned into a recipe.
    #[error("recipe toml: {0}")]
    Toml(String),
    /// A field has an invalid value (from [`Recipe::validate`]).
    #[error("{field}: {message}")]
    Invalid {
        /// The dotted field name.
        field: String,
        /// What is wrong, with the value found.
        message: String,
    },
}

/// Image interpolation for resizing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    /// Bilinear.
    Bilinear,
    /// Bicubic.
    Bicubic,
    /// A uniform choice of bilinear or bicubic per call (timm `'random'`).
    Random,
}

/// Data sizes and resizing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Train crop size in pixels (RandomResizedCrop output).
    pub train_size_px: u32,
    /// Evaluation crop size in pixels.
    pub test_size_px: u32,
    /// Evaluation centre-crop ratio: resize the short side to `floor(test_size_px / crop_pct)`.
    pub crop_pct: f64,
    /// Interpolation of RandomResizedCrop and RandAugment's geometric ops.
    pub train_interpolation: Interpolation,
    /// Interpolation of the evaluation resize.
    pub test_interpolation: Interpolation,
}

/// Per-image and per-batch augmentation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AugmentConfig {
    /// timm RandAugment string, parsed by [`loader::rand_augment::RandAugmentConfig::parse`];
    /// empty disables RandAugment.
    pub rand_augment: String,
    /// Mixup Beta(α, α); 0 disables mixup.
    pub mixup_alpha: f64,
    /// CutMix Beta(α, α); 0 disables cutmix.
    pub cutmix_alpha: f64,
    /// Probability that a batch is mixed at all (`--mixup-prob`).
    pub mix_prob: f64,
    /// Probability of CutMix rather than Mixup when both are on (`--mixup-switch-prob`).
    pub switch_prob: f64,
    /// Label smoothing ε of the mixed targets (`--smoothing`).
    pub smoothing: f64,
    /// Repeated augmentation: copies of each image per epoch (3 = timm `RepeatAugSampler`, 1 = off).
    pub repeated_aug: u32,
    /// Horizontal flip probability.
    pub hflip: f64,
}

/// The network.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Architecture name (`resnet50`).
    pub name: String,
    /// Stochastic-depth rate of the last block (linear from 0 over the blocks).
    pub drop_path_rate: f64,
    /// Output classes; 0 takes the count from the dataset manifest.
    pub num_classes: u32,
}

/// Which optimizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// timm LAMB ([`crate::optim::Lamb`]).
    Lamb,
    /// SGD with momentum ([`crate::optim::Sgd`]).
    Sgd,
}

/// How the learning rate follows the global batch size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrScaling {
    /// `lr` is used as given, whatever the batch.
    None,
    /// `lr · global_batch / reference_batch`.
    Linear,
    /// `lr · sqrt(global_batch / reference_batch)`.
    Sqrt,
}

/// Optimizer hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// `lamb` or `sgd`.
    pub name: OptimizerKind,
    /// Peak learning rate at `reference_batch` (see [`Recipe::resolved_lr`]).
    pub lr: f64,
    /// L2 weight decay of the decay group (not of 1-D params and biases).
    pub weight_decay: f64,
    /// LAMB `(β1, β2)`.
    pub betas: [f64; 2],
    /// LAMB ε.
    pub eps: f64,
    /// LAMB's built-in global gradient-norm clip; 0 disables it.
    pub max_grad_norm: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// SGD Nesterov momentum.
    pub nesterov: bool,
    /// Batch-size rule for the learning rate.
    pub lr_scaling: LrScaling,
    /// The global batch at which `lr` applies unscaled.
    pub reference_batch: u32,
}

/// Learning-rate schedule (cosine with warmup, [`CosineWithWarmup`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Cosine length in epochs (the paper's epoch count).
    pub epochs: u32,
    /// Linear warmup epochs.
    pub warmup_epochs: u32,
    /// Learning rate at the start of the warmup.
    pub warmup_lr: f64,
    /// Floor of the cosine and rate of the cooldown.
    pub min_lr: f64,
    /// Epochs at `min_lr` after the cosine.
    pub cooldown_epochs: u32,
    /// Change the rate after every update (timm HEAD `--sched-on-updates`) instead of per epoch.
    pub per_step: bool,
}

/// Which training loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// [`crate::loss::BinaryCrossEntropy`].
    Bce,
    /// Cross-entropy: [`crate::loss::SoftTargetCrossEntropy`] on mixed targets, else
    /// [`crate::loss::LabelSmoothingCrossEntropy`].
    Ce,
}

/// Training loss. Validation always uses plain cross-entropy (timm `validate`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    /// `bce` or `ce`.
    pub kind: LossKind,
    /// BCE: binarise targets at this value (`--bce-target-thresh`); absent keeps them soft.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_threshold: Option<f64>,
    /// Smoothing for class-index targets, i.e. batches that did not go through mixup (timm passes
    /// `--smoothing` here; mixed targets are smoothed by mixup).
    pub smoothing: f64,
}

/// Batch sizes, seeding and cadence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Images per optimizer update, over all micro-batches.
    pub global_batch: u32,
    /// Images per forward/backward on the device (the BatchNorm and mixup batch).
    pub micro_batch: u32,
    /// Run seed (data order, augmentation, init).
    pub seed: u64,
    /// Evaluate every this many epochs.
    pub eval_every_epochs: u32,
    /// Checkpoint every this many updates; 0 = only at the end of each epoch.
    pub checkpoint_every_steps: u64,
    /// Log every this many updates.
    pub log_every_steps: u64,
    /// Loader worker threads; 0 = one per available core.
    pub workers: u32,
    /// Compute threads for CPU tensor maths (candle's rayon/gemm pool); 0 = library default.
    pub threads: u32,
}

/// Fine-tuning a pretrained network (`train --init-from`): how its trunk (every parameter but the
/// classifier `fc`) and its BatchNorm statistics are treated. The defaults change nothing, so a
/// recipe without this section trains as before; it is left out of `recipe.toml` (and so of the
/// recipe hash) while every value is the default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneConfig {
    /// The trunk's learning rate is the schedule's times this factor; the classifier takes the
    /// schedule's own (PyTorch's per-group `lr`: a lower rate for pretrained layers than for the
    /// new head). 1 = one rate for all; 0 is not allowed (use `freeze_trunk_epochs`).
    pub trunk_lr_scale: f64,
    /// The trunk receives no update during the first N epochs (as `requires_grad = False` in
    /// PyTorch: no gradient step, no weight decay, no optimizer state, left out of LAMB's global
    /// gradient norm); only the classifier learns. Its BatchNorm running statistics still follow
    /// the new data, as a PyTorch module in train mode does. 0 = never frozen.
    pub freeze_trunk_epochs: u32,
    /// Before the first update of a new run, replace every BatchNorm running mean and variance by
    /// its average over this many batches of the new training set (forward passes in train mode
    /// that update nothing else; the average of the per-batch statistics, as PyTorch's
    /// `torch.optim.swa_utils.update_bn`). The batches are the first ones of the train split in
    /// file order, with the evaluation transform, so the statistics do not depend on the
    /// augmentation draws. 0 = keep the checkpoint's statistics as the start. Either way the
    /// training then moves them with momentum 0.1 as always.
    pub bn_reestimate_batches: u32,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            trunk_lr_scale: 1.0,
            freeze_trunk_epochs: 0,
            bn_reestimate_batches: 0,
        }
    }
}

impl FinetuneConfig {
    /// Whether every value is the default (then the section is not written).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// A complete training recipe. See the [module docs](self).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Data sizes and resizing.
    pub data: DataConfig,
    /// Augmentation.
    pub augment: AugmentConfig,
    /// Network.
    pub model: ModelConfig,
    /// Optimizer.
    pub optim: OptimConfig,
    /// Learning-rate schedule.
    pub schedule: ScheduleConfig,
    /// Training loss.
    pub loss: LossConfig,
    /// Batches, seed, cadence.
    pub run: RunConfig,
    /// Fine-tuning (trunk learning rate, frozen trunk, BatchNorm statistics); absent = defaults.
    #[serde(default, skip_serializing_if = "FinetuneConfig::is_default")]
    pub finetune: FinetuneConfig,
}

/// Keys that may be absent from a serialised recipe (optional fields), so `--set` may add them.
const OPTIONAL_KEYS: &[&str] = &["loss.target_threshold"];

impl Recipe {
    /// The preset names: the paper's three, and `ft` for fine-tuning.
    pub const PRESETS: &'static [&'static str] = &["a1", "a2", "a3", "ft"];

    /// RSB A1: 600 epochs, LAMB 5e-3, wd 0.01, BCE, repeated aug ×3 (arXiv 2110.00476 Table 1).
    pub fn a1() -> Self {
        Self {
            data: DataConfig {
                train_size_px: 224,                         // T1 "Train res" 224
                test_size_px: 224,                          // T1 "Test res" 224
                crop_pct: 0.95, // T1 "Test crop ratio" 0.95 (timm resnet.py _rcfg)
                train_interpolation: Interpolation::Random, // §1.2 v0.5.4 default; RSB value unverified
                test_interpolation: Interpolation::Bicubic, // §1.2 "Eval interpolation" bicubic
            },
            augment: AugmentConfig {
                rand_augment: "rand-m7-mstd0.5-inc1".into(), // T1 "RandAugment" 7 / 0.5
                mixup_alpha: 0.2,                            // T1 "Mixup α" 0.2
                cutmix_alpha: 1.0,                           // T1 "CutMix α" 1.0
                mix_prob: 1.0,                               // §1.2 `--mixup-prob` 1.0
                switch_prob: 0.5,                            // §1.2 `--mixup-switch-prob` 0.5
                smoothing: 0.1, // T1 "Label smoothing" 0.1 (per-recipe split unverified)
                repeated_aug: 3, // T1 "Repeated aug (×3)" ✓
                hflip: 0.5,     // T1 "H-flip, RRC" ✓ (timm hflip 0.5)
            },
            model: ModelConfig {
                name: "resnet50".into(), // §1.2 "Model" resnet50
                drop_path_rate: 0.05,    // T1 "Stochastic depth" 0.05
                num_classes: 0,          // from the dataset (1000 for ImageNet-1k)
            },
            optim: OptimConfig {
                name: OptimizerKind::Lamb,   // T1 "Optimizer" LAMB
                lr: 5e-3,                    // T1 "LR" 5e-3 at batch 2048
                weight_decay: 0.01,          // T1 "Weight decay" 0.01
                betas: [0.9, 0.999],         // §1.2 "LAMB betas / eps"
                eps: 1e-6,                   // §1.2 "LAMB betas / eps" 1e-6
                max_grad_norm: 1.0,          // §1.2 "LAMB max_grad_norm" 1.0 (built in)
                momentum: 0.9,               // SGD only (v0.5.4 `--momentum` 0.9)
                nesterov: false,             // SGD only
                lr_scaling: LrScaling::Sqrt, // choice, see module docs; identity at 2048
                reference_batch: 2048,       // T1 "Batch size" 2048
            },
            schedule: ScheduleConfig {
                epochs: 600,        // T1 "Epochs" 600
                warmup_epochs: 5,   // T1 "Warmup epochs" 5
                warmup_lr: 1e-4,    // §1.2 `--warmup-lr` 1e-4 (2021 default)
                min_lr: 1e-6,       // §1.2 `--min-lr` 1e-6 (2021 default)
                cooldown_epochs: 0, // §1.2 `--cooldown-epochs`: unverified; 0 chosen, see module docs
                per_step: false,    // §1.2 "LR schedule granularity" per epoch
            },
            loss: LossConfig {
                kind: LossKind::Bce,         // T1 "Loss" BCE
                target_threshold: Some(0.2), // §1.2 `--bce-target-thresh` 0.2
                smoothing: 0.1,              // = augment.smoothing (timm passes --smoothing)
            },
            run: RunConfig {
                global_batch: 2048,        // T1 "Batch size" 2048
                micro_batch: 256,          // device batch; paper 512/GPU (§1.2), not a paper value
                seed: 42,                  // v0.5.4 `--seed` default 42
                eval_every_epochs: 1,      // timm evaluates every epoch
                checkpoint_every_steps: 0, // timm saves per epoch (`--recovery-interval` 0)
                log_every_steps: 50,       // v0.5.4 `--log-interval` 50
                workers: 0,                // all cores
                threads: 0,                // library default
            },
            finetune: FinetuneConfig::default(), // training from scratch
        }
    }

    /// RSB A2: A1 with 300 epochs, wd 0.02, mixup 0.1, no label smoothing (Table 1).
    pub fn a2() -> Self {
        let mut r = Self::a1();
        r.schedule.epochs = 300; // T1 "Epochs" 300
        r.optim.weight_decay = 0.02; // T1 "Weight decay" 0.02
        r.augment.mixup_alpha = 0.1; // T1 "Mixup α" 0.1
        r.augment.smoothing = 0.0; // T1 "Label smoothing" ✗ (unverified split)
        r.loss.smoothing = 0.0; // = augment.smoothing
        r
    }

    /// RSB A3: A2 with 100 epochs at 160 px, LR 8e-3, RandAugment m6, no stochastic depth and no
    /// repeated augmentation (Table 1).
    pub fn a3() -> Self {
        let mut r = Self::a2();
        r.schedule.epochs = 100; // T1 "Epochs" 100
        r.data.train_size_px = 160; // T1 "Train res" 160 (test stays 224)
        r.optim.lr = 8e-3; // T1 "LR" 8e-3
        r.augment.rand_augment = "rand-m6-mstd0.5-inc1".into(); // T1 "RandAugment" 6 / 0.5
        r.model.drop_path_rate = 0.0; // T1 "Stochastic depth" ✗
        r.augment.repeated_aug = 1; // T1 "Repeated aug" ✗
        r
    }

    /// Fine-tuning a pretrained network on a new data set (`train --init-from`), the paper's
    /// Table 5 use. The RSB paper does not list its transfer hyper-parameters; these are the
    /// fine-tuning values that its second author gave for DeiT on CIFAR-10 and Stanford Cars
    /// ("FT" = facebookresearch/deit issue #45, H. Touvron, 2021-01-22: image size 224, batch
    /// 768, lr 0.01, SGD, weight decay 1e-4, 1000 epochs, no random erasing and no stochastic
    /// depth, "all other elements are the same as for training on ImageNet"), with DeiT
    /// `main.py`'s schedule defaults ("DeiT": warmup 5 epochs from 1e-6, min lr 1e-5). "All other
    /// elements" are read as A2's (the RSB recipe at 224 px): BCE, RandAugment m7, mixup 0.1,
    /// CutMix 1.0, repeated augmentation ×3. Whether RSB fine-tuned exactly so is unverified.
    /// CIFAR's 32 px images are upsampled to the 224 px train size by the RandomResizedCrop, as
    /// in DeiT and the transfer literature. The `finetune` section stays at its defaults (one
    /// rate, nothing frozen): set it to taste.
    pub fn ft() -> Self {
        let mut r = Self::a2();
        r.optim.name = OptimizerKind::Sgd; // FT "optimizer: SGD"
        r.optim.momentum = 0.9; // SGD momentum 0.9 (DeiT/timm `--momentum` default)
        r.optim.lr = 0.01; // FT "lr: 0.01" (at batch 768, after DeiT's linear scaling)
        r.optim.reference_batch = 768; // FT "Batch size: 768"
        r.optim.lr_scaling = LrScaling::Linear; // DeiT scales the lr linearly with the batch
        r.optim.weight_decay = 1e-4; // FT "weight-decay: 1e-4"
        r.run.global_batch = 768; // FT "Batch size: 768"
        r.schedule.epochs = 1000; // FT "epochs: 1000" (CIFAR-10 / Cars; shorten for large sets)
        r.schedule.warmup_epochs = 5; // DeiT `--warmup-epochs` 5
        r.schedule.warmup_lr = 1e-6; // DeiT `--warmup-lr` 1e-6
        r.schedule.min_lr = 1e-5; // DeiT `--min-lr` 1e-5
        r.model.drop_path_rate = 0.0; // FT "We remove ... stochastic depth"
        r
    }

    /// The preset called `name` (`a1`, `a2`, `a3` or `ft`).
    pub fn preset(name: &str) -> Result<Self, RecipeError> {
        match name {
            "a1" => Ok(Self::a1()),
            "a2" => Ok(Self::a2()),
            "a3" => Ok(Self::a3()),
            "ft" => Ok(Self::ft()),
            _ => Err(RecipeError::UnknownPreset {
                name: name.to_string(),
                known: Self::PRESETS,
            }),
        }
    }

    /// Parses a complete recipe from TOML (every field required, unknown fields rejected).
    pub fn from_toml_str(text: &str) -> Result<Self, RecipeError> {
        toml::from_str(text).map_err(|e| RecipeError::Toml(e.to_string()))
    }

    /// The recipe as TOML (what a run writes to `<run_dir>/recipe.toml`).
    pub fn to_toml_string(&self) -> Result<String, RecipeError> {
        toml::to_string(self).map_err(|e| RecipeError::Toml(e.to_string()))
    }

    /// The recipe as a TOML tree, every section present (a default `finetune` too, so that
    /// overrides and diffs see its keys).
    pub fn to_toml_value(&self) -> Result<toml::Value, RecipeError> {
        let mut tree = toml::Value::try_from(self).map_err(|e| RecipeError::Toml(e.to_string()))?;
        if let Some(table) = tree.as_table_mut() {
            if !table.contains_key("finetune") {
                let section = toml::Value::try_from(&self.finetune)
                    .map_err(|e| RecipeError::Toml(e.to_string()))?;
                table.insert("finetune".into(), section);
            }
        }
        Ok(tree)
    }

    /// Deserialises a recipe from a TOML tree.
    pub fn from_toml_value(value: toml::Value) -> Result<Self, RecipeError> {
        value
            .try_into()
            .map_err(|e: toml::de::Error| RecipeError::Toml(e.to_string()))
    }

    /// This recipe with `--set key=value` overrides applied, in order, to its TOML tree before
    /// deserialising. See [`apply_overrides`].
    pub fn with_overrides<S: AsRef<str>>(&self, overrides: &[S]) -> Result<Self, RecipeError> {
        let mut tree = self.to_toml_value()?;
        apply_overrides(&mut tree, overrides)?;
        Self::from_toml_value(tree)
    }

    /// Applies `--set key=value` overrides in place (see [`apply_overrides`]); on error `self` is
    /// unchanged.
    pub fn apply_overrides<S: AsRef<str>>(&mut self, overrides: &[S]) -> Result<(), RecipeError> {
        *self = self.with_overrides(overrides)?;
        Ok(())
    }

    /// This recipe with a partial TOML recipe laid over it (`--preset a2 --config run.toml`):
    /// only the keys present in `text` change, each checked like a `--set` override; `origin`
    /// (the file's path) names the source in errors. A complete recipe works too.
    pub fn merged_with_toml_str(&self, text: &str, origin: &str) -> Result<Self, RecipeError> {
        let partial: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| RecipeError::Toml(format!("{origin}: {e}")))?;
        let mut tree = self.to_toml_value()?;
        merge_toml_tree(&mut tree, &partial, origin)?;
        Self::from_toml_value(tree)
    }

    /// The learning rate for `global_batch` under `optim.lr_scaling`, and a log line that spells
    /// the rule out.
    pub fn resolved_lr(&self, global_batch: u32) -> (f64, String) {
        let o = &self.optim;
        let ratio = global_batch as f64 / o.reference_batch as f64;
        let (lr, rule) = match o.lr_scaling {
            LrScaling::None => (o.lr, "none: lr used as given".to_string()),
            LrScaling::Linear => (
                o.lr * ratio,
                format!("linear: {:e} * {global_batch}/{}", o.lr, o.reference_batch),
            ),
            LrScaling::Sqrt => (
                o.lr * ratio.sqrt(),
                format!(
                    "sqrt: {:e} * sqrt({global_batch}/{})",
                    o.lr, o.reference_batch
                ),
            ),
        };
        let line = format!(
            "lr {lr:e} for global batch {global_batch} (base {:e} at reference batch {}, scaling {rule})",
            o.lr, o.reference_batch
        );
        (lr, line)
    }

    /// Micro-batches per optimizer update (`global_batch / micro_batch`).
    pub fn accumulation_steps(&self) -> u32 {
        self.run.global_batch / self.run.micro_batch.max(1)
    }

    /// Whether mixup or cutmix is on.
    pub fn mixup_active(&self) -> bool {
        self.augment.mix_prob > 0.0
            && (self.augment.mixup_alpha > 0.0 || self.augment.cutmix_alpha > 0.0)
    }

    /// The schedule at peak rate `base_lr` (normally [`Recipe::resolved_lr`]).
    /// `updates_per_epoch` is used when `schedule.per_step` is set.
    pub fn cosine_schedule(&self, base_lr: f64, updates_per_epoch: u64) -> CosineWithWarmup {
        let s = &self.schedule;
        CosineWithWarmup {
            base_lr,
            warmup_lr: s.warmup_lr,
            warmup_epochs: s.warmup_epochs as u64,
            min_lr: s.min_lr,
            epochs: s.epochs as u64,
            cooldown_epochs: s.cooldown_epochs as u64,
            granularity: if s.per_step {
                Granularity::PerUpdate { updates_per_epoch }
            } else {
                Granularity::PerEpoch
            },
        }
    }

    /// LAMB settings from `optim` (timm's fixed flags: bias correction, grad averaging, no
    /// always-adapt, no trust clip).
    pub fn lamb_config(&self) -> LambConfig {
        let o = &self.optim;
        LambConfig {
            betas: (o.betas[0], o.betas[1]),
            eps: o.eps,
            max_grad_norm: (o.max_grad_norm > 0.0).then_some(o.max_grad_norm),
            ..LambConfig::default()
        }
    }

    /// SGD settings from `optim`.
    pub fn sgd_config(&self) -> SgdConfig {
        SgdConfig {
            momentum: self.optim.momentum,
            dampening: 0.0,
            nesterov: self.optim.nesterov,
        }
    }

    /// The BCE training loss of `loss` (used when `loss.kind = bce`).
    pub fn bce(&self) -> BinaryCrossEntropy {
        BinaryCrossEntropy {
            smoothing: self.loss.smoothing,
            target_threshold: self.loss.target_threshold.map(|t| t as f32),
        }
    }

    /// The training loss `loss.kind` selects (timm v0.5.4 `train.py`).
    pub fn train_loss(&self) -> TrainLoss {
        match self.loss.kind {
            LossKind::Bce => TrainLoss::Bce(self.bce()),
            LossKind::Ce => TrainLoss::Ce {
                smoothing: self.loss.smoothing,
            },
        }
    }

    /// Log lines for the settings whose RSB value is unverified or a choice of this port (see
    /// the module docs), with the values this recipe uses. A run prints them at start.
    pub fn unverified_notes(&self) -> Vec<String> {
        vec![
            format!(
                "schedule.cooldown_epochs = {} (timm v0.5.4 default 10; whether RSB passed 0 is unverified)",
                self.schedule.cooldown_epochs
            ),
            format!(
                "augment.smoothing = {} (Table 1 split A1 0.1 / A2, A3 0 is recalled, unverified)",
                self.augment.smoothing
            ),
            format!(
                "data.train_interpolation = {:?} (timm v0.5.4 default random; RSB value unverified)",
                self.data.train_interpolation
            ),
            format!(
                "optim.lr_scaling = {:?} with reference_batch {} (a choice of this port; identity at the paper's batch 2048)",
                self.optim.lr_scaling, self.optim.reference_batch
            ),
            format!(
                "run.micro_batch = {} (BatchNorm/mixup batch; the paper used 512 per GPU)",
                self.run.micro_batch
            ),
        ]
    }

    /// The fields whose values differ from `base`, as `key: base -> self` lines (for the run log).
    pub fn diff(&self, base: &Recipe) -> Result<Vec<String>, RecipeError> {
        let mut ours = BTreeMap::new();
        let mut theirs = BTreeMap::new();
        flatten("", &self.to_toml_value()?, &mut ours);
        flatten("", &base.to_toml_value()?, &mut theirs);
        let mut keys: Vec<&String> = ours.keys().chain(theirs.keys()).collect();
        keys.sort();
        keys.dedup();
        let absent = "(absent)".to_string();
        Ok(keys
            .into_iter()
            .filter(|k| ours.get(*k) != theirs.get(*k))
            .map(|k| {
                format!(
                    "{k}: {} -> {}",
                    theirs.get(k).unwrap_or(&absent),
                    ours.get(k).unwrap_or(&absent)
                )
            })
            .collect())
    }

    /// Checks every field and reports all problems at once.
    pub fn validate(&self) -> Result<(), Vec<RecipeError>> {
        let mut errs = Vec::new();
        let mut check = |ok: bool, field: &str, message: String| {
            if !ok {
                errs.push(RecipeError::Invalid {
                    field: field.to_string(),
                    message,
                });
            }
        };
        let unit = |x: f64| (0.0..=1.0).contains(&x);
        let (d, a, m, o, s, l, r) = (
            &self.data,
            &self.augment,
            &self.model,
            &self.optim,
            &self.schedule,
            &self.loss,
            &self.run,
        );

        check(
            d.train_size_px > 0,
            "data.train_size_px",
            "must be > 0".into(),
        );
        check(
            d.test_size_px > 0,
            "data.test_size_px",
            "must be > 0".into(),
        );
        check(
            d.crop_pct > 0.0 && d.crop_pct <= 1.0,
            "data.crop_pct",
            format!("must be in (0, 1], found {}", d.crop_pct),
        );

        if !a.rand_augment.is_empty() {
            if let Err(e) = loader::rand_augment::RandAugmentConfig::parse(&a.rand_augment) {
                check(false, "augment.rand_augment", e);
            }
        }
        check(
            a.mixup_alpha >= 0.0,
            "augment.mixup_alpha",
            format!("must be >= 0, found {}", a.mixup_alpha),
        );
        check(
            a.cutmix_alpha >= 0.0,
            "augment.cutmix_alpha",
            format!("must be >= 0, found {}", a.cutmix_alpha),
        );
        check(
            unit(a.mix_prob),
            "augment.mix_prob",
            format!("must be in [0, 1], found {}", a.mix_prob),
        );
        check(
            unit(a.switch_prob),
            "augment.switch_prob",
            format!("must be in [0, 1], found {}", a.switch_prob),
        );
        check(
            (0.0..1.0).contains(&a.smoothing),
            "augment.smoothing",
            format!("must be in [0, 1), found {}", a.smoothing),
        );
        check(
            a.repeated_aug >= 1,
            "augment.repeated_aug",
            "must be >= 1 (1 = off)".into(),
        );
        check(
            unit(a.hflip),
            "augment.hflip",
            format!("must be in [0, 1], found {}", a.hflip),
        );

        check(!m.name.is_empty(), "model.name", "must not be empty".into());
        check(
            (0.0..1.0).contains(&m.drop_path_rate),
            "model.drop_path_rate",
            format!("must be in [0, 1), found {}", m.drop_path_rate),
        );

        check(
            o.lr > 0.0 && o.lr.is_finite(),
            "optim.lr",
            format!("must be > 0, found {}", o.lr),
        );
        check(
            o.weight_decay >= 0.0,
            "optim.weight_decay",
            format!("must be >= 0, found {}", o.weight_decay),
        );
        check(
            o.betas.iter().all(|b| (0.0..1.0).contains(b)),
            "optim.betas",
            format!("each must be in [0, 1), found {:?}", o.betas),
        );
        check(
            o.eps > 0.0,
            "optim.eps",
            format!("must be > 0, found {}", o.eps),
        );
        check(
            o.max_grad_norm >= 0.0,
            "optim.max_grad_norm",
            format!("must be >= 0 (0 = off), found {}", o.max_grad_norm),
        );
        check(
            (0.0..1.0).contains(&o.momentum),
            "optim.momentum",
            format!("must be in [0, 1), found {}", o.momentum),
        );
        check(
            !(o.nesterov && o.momentum == 0.0),
            "optim.nesterov",
            "needs momentum > 0".into(),
        );
        check(
            o.reference_batch > 0,
            "optim.reference_batch",
            "must be > 0".into(),
        );

        check(s.epochs > 0, "schedule.epochs", "must be > 0".into());
        check(
            s.warmup_epochs < s.epochs,
            "schedule.warmup_epochs",
            format!(
                "must be < schedule.epochs ({}), found {}",
                s.epochs, s.warmup_epochs
            ),
        );
        check(
            s.warmup_lr >= 0.0,
            "schedule.warmup_lr",
            format!("must be >= 0, found {}", s.warmup_lr),
        );
        check(
            s.min_lr >= 0.0 && s.min_lr <= o.lr,
            "schedule.min_lr",
            format!("must be in [0, optim.lr = {}], found {}", o.lr, s.min_lr),
        );

        if let Some(t) = l.target_threshold {
            check(
                (0.0..1.0).contains(&t),
                "loss.target_threshold",
                format!("must be in [0, 1), found {t}"),
            );
            check(
                l.kind == LossKind::Bce,
                "loss.target_threshold",
                "only applies to loss.kind = \"bce\"".into(),
            );
        }
        check(
            (0.0..1.0).contains(&l.smoothing),
            "loss.smoothing",
            format!("must be in [0, 1), found {}", l.smoothing),
        );

        check(r.global_batch > 0, "run.global_batch", "must be > 0".into());
        check(r.micro_batch > 0, "run.micro_batch", "must be > 0".into());
        if r.micro_batch > 0 {
            check(
                r.global_batch % r.micro_batch == 0,
                "run.global_batch",
                format!(
                    "must be a multiple of run.micro_batch ({}), found {}",
                    r.micro_batch, r.global_batch
                ),
            );
        }
        check(
            !self.mixup_active() || r.micro_batch % 2 == 0,
            "run.micro_batch",
            format!(
                "must be even with mixup/cutmix on (partner = reversed batch), found {}",
                r.micro_batch
            ),
        );
        check(
            r.eval_every_epochs > 0,
            "run.eval_every_epochs",
            "must be > 0".into(),
        );
        check(
            r.log_every_steps > 0,
            "run.log_every_steps",
            "must be > 0".into(),
        );

        let f = &self.finetune;
        check(
            f.trunk_lr_scale > 0.0 && f.trunk_lr_scale.is_finite(),
            "finetune.trunk_lr_scale",
            format!(
                "must be > 0 (freeze the trunk with finetune.freeze_trunk_epochs), found {}",
                f.trunk_lr_scale
            ),
        );
        check(
            f.freeze_trunk_epochs <= s.epochs + s.cooldown_epochs,
            "finetune.freeze_trunk_epochs",
            format!(
                "must be at most the run's {} epochs, found {}",
                s.epochs + s.cooldown_epochs,
                f.freeze_trunk_epochs
            ),
        );

        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs)
        }
    }
}

/// `key = value` lines of a TOML tree, keys dotted.
fn flatten(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// Parses the right-hand side of `--set`: a TOML value (`3.5e-3`, `true`, `[0.9, 0.99]`,
/// `"bicubic"`), or else the bare text as a string (`model.name=resnet50`).
fn parse_override_value(text: &str) -> toml::Value {
    let doc = format!("v = {text}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(text.to_string())),
        Err(_) => toml::Value::String(text.to_string()),
    }
}

/// Applies `key=value` overrides to a recipe's TOML tree, in order.
///
/// * Every dotted key must name an existing field (or an optional one that may be absent, such as
///   `loss.target_threshold`); otherwise [`RecipeError::UnknownKey`] lists the valid keys.
/// * The value must have the field's TOML type; an integer is accepted for a float field
///   (`optim.lr=1`). Otherwise [`RecipeError::TypeMismatch`].
pub fn apply_overrides<S: AsRef<str>>(
    tree: &mut toml::Value,
    overrides: &[S],
) -> Result<(), RecipeError> {
    for arg in overrides {
        let arg = arg.as_ref();
        let Some((key, text)) = arg.split_once('=') else {
            return Err(RecipeError::MalformedOverride { arg: arg.into() });
        };
        let key = key.trim();
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(RecipeError::MalformedOverride { arg: arg.into() });
        }
        let value = parse_override_value(text.trim());
        set_key(tree, key, value, text.trim(), "--set")?;
    }
    Ok(())
}

/// Merges a partial recipe (`[optim]\nlr = 4e-3`) into a recipe's TOML tree, with the checks of
/// [`apply_overrides`]; `origin` names the source in errors (a config file's path).
pub fn merge_toml_tree(
    tree: &mut toml::Value,
    partial: &toml::Table,
    origin: &str,
) -> Result<(), RecipeError> {
    let mut leaves = Vec::new();
    collect_leaves("", partial, &mut leaves);
    for (key, value) in leaves {
        let shown = value.to_string();
        set_key(tree, &key, value, &shown, origin)?;
    }
    Ok(())
}

/// The non-table values of a TOML table with their dotted keys, in document order.
fn collect_leaves(prefix: &str, table: &toml::Table, out: &mut Vec<(String, toml::Value)>) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) => collect_leaves(&key, t, out),
            other => out.push((key, other.clone())),
        }
    }
}

/// Sets one dotted key of `tree` to `value`, checking that the key exists and the type matches.
fn set_key(
    tree: &mut toml::Value,
    key: &str,
    mut value: toml::Value,
    shown: &str,
    origin: &str,
) -> Result<(), RecipeError> {
    let parts: Vec<&str> = key.split('.').collect();
    let (last, sections) = parts.split_last().expect("split yields at least one part");
    let unknown = |known: Vec<String>| RecipeError::UnknownKey {
        origin: origin.into(),
        key: key.into(),
        known,
    };
    let mut table = tree
        .as_table_mut()
        .ok_or_else(|| RecipeError::Toml("the recipe is not a table".into()))?;
    for section in sections {
        let known: Vec<String> = table.keys().cloned().collect();
        table = match table.get_mut(*section) {
            Some(toml::Value::Table(t)) => t,
            _ => return Err(unknown(known)),
        };
    }
    match table.get(*last) {
        Some(existing) => {
            if let (toml::Value::Float(_), toml::Value::Integer(i)) = (existing, &value) {
                value = toml::Value::Float(*i as f64);
            }
            if existing.type_str() != value.type_str() {
                return Err(RecipeError::TypeMismatch {
                    origin: origin.into(),
                    key: key.into(),
                    expected: existing.type_str().into(),
                    found: value.type_str().into(),
                    value: shown.into(),
                });
            }
        }
        None if OPTIONAL_KEYS.contains(&key) => {}
        None => {
            let prefix = format!("{}.", sections.join("."));
            let mut known: Vec<String> = table.keys().cloned().collect();
            known.extend(
                OPTIONAL_KEYS
                    .iter()
                    .filter_map(|k| k.strip_prefix(prefix.as_str()))
                    .filter(|k| !k.contains('.'))
                    .map(str::to_string),
            );
            known.sort();
            return Err(unknown(known));
        }
    }
    table.insert(last.to_string(), value);
    Ok(())
}
