//! Recipe presets, TOML round trips, `--set` overrides and validation.

use trainer::recipe::{
    apply_overrides, Interpolation, LossKind, LrScaling, OptimizerKind, Recipe, RecipeError,
};

#[test]
fn presets_carry_the_table_values() {
    // (epochs, train px, lr, wd, randaug, mixup, repeated aug, drop path, smoothing)
    let want = [
        (
            "a1",
            600,
            224,
            5e-3,
            0.01,
            "rand-m7-mstd0.5-inc1",
            0.2,
            3,
            0.05,
            0.1,
        ),
        (
            "a2",
            300,
            224,
            5e-3,
            0.02,
            "rand-m7-mstd0.5-inc1",
            0.1,
            3,
            0.05,
            0.0,
        ),
        (
            "a3",
            100,
            160,
            8e-3,
            0.02,
            "rand-m6-mstd0.5-inc1",
            0.1,
            1,
            0.0,
            0.0,
        ),
    ];
    for (name, epochs, px, lr, wd, ra, mixup, rep, dpr, smoothing) in want {
        let r = Recipe::preset(name).unwrap();
        assert_eq!(r.schedule.epochs, epochs, "{name}");
        assert_eq!(r.data.train_size_px, px, "{name}");
        assert_eq!(r.data.test_size_px, 224, "{name}");
        assert_eq!(r.data.crop_pct, 0.95, "{name}");
        assert_eq!(r.data.test_interpolation, Interpolation::Bicubic);
        assert_eq!(r.optim.lr, lr, "{name}");
        assert_eq!(r.optim.weight_decay, wd, "{name}");
        assert_eq!(r.optim.name, OptimizerKind::Lamb);
        assert_eq!(r.optim.eps, 1e-6);
        assert_eq!(r.optim.max_grad_norm, 1.0);
        assert_eq!(r.augment.rand_augment, ra, "{name}");
        assert_eq!(r.augment.mixup_alpha, mixup, "{name}");
        assert_eq!(r.augment.cutmix_alpha, 1.0, "{name}");
        assert_eq!(r.augment.repeated_aug, rep, "{name}");
        assert_eq!(r.model.drop_path_rate, dpr, "{name}");
        assert_eq!(r.augment.smoothing, smoothing, "{name}");
        assert_eq!(r.loss.smoothing, smoothing, "{name}");
        assert_eq!(r.loss.kind, LossKind::Bce);
        assert_eq!(r.loss.target_threshold, Some(0.2));
        assert_eq!(r.schedule.warmup_epochs, 5);
        assert_eq!(r.schedule.warmup_lr, 1e-4);
        assert_eq!(r.schedule.min_lr, 1e-6);
        assert!(!r.schedule.per_step);
        assert_eq!(r.run.global_batch, 2048);
        r.validate().unwrap();
        // At the paper's batch the LR is the paper's, whatever the rule.
        assert_eq!(r.resolved_lr(2048).0, lr);
    }
}

#[test]
fn unknown_preset_lists_the_known_ones() {
    let e = Recipe::preset("a4").unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown preset \"a4\"; known presets: a1, a2, a3, ft"
    );
}

#[test]
fn toml_round_trip() {
    for name in Recipe::PRESETS {
        let r = Recipe::preset(name).unwrap();
        let text = r.to_toml_string().unwrap();
        assert_eq!(Recipe::from_toml_str(&text).unwrap(), r, "{name}:\n{text}");
    }
    let mut r = Recipe::a1();
    r.loss.target_threshold = None;
    let text = r.to_toml_string().unwrap();
    assert!(!text.contains("target_threshold"));
    assert_eq!(Recipe::from_toml_str(&text).unwrap(), r);
}

#[test]
fn toml_rejects_unknown_and_missing_fields() {
    let text = Recipe::a1().to_toml_string().unwrap();
    let stray = text.replace("[optim]\n", "[optim]\nbn_wd = 0\n");
    let e = Recipe::from_toml_str(&stray).unwrap_err().to_string();
    assert!(e.contains("unknown field `bn_wd`"), "{e}");
    let missing = text.replace("epochs = 600\n", "");
    let e = Recipe::from_toml_str(&missing).unwrap_err().to_string();
    assert!(e.contains("missing field `epochs`"), "{e}");
}

#[test]
fn overrides_apply_in_order_with_types() {
    let r = Recipe::a2()
        .with_overrides(&[
            "optim.lr=3.5e-3",
            "schedule.cooldown_epochs=10",
            "model.name=resnet26",
            "optim.lr_scaling=\"linear\"",
            "optim.betas=[0.9, 0.99]",
            "schedule.per_step=true",
            "optim.weight_decay=0",
            "optim.lr=4e-3",
        ])
        .unwrap();
    assert_eq!(r.optim.lr, 4e-3);
    assert_eq!(r.schedule.cooldown_epochs, 10);
    assert_eq!(r.model.name, "resnet26");
    assert_eq!(r.optim.lr_scaling, LrScaling::Linear);
    assert_eq!(r.optim.betas, [0.9, 0.99]);
    assert!(r.schedule.per_step);
    assert_eq!(r.optim.weight_decay, 0.0);
    let diff = r.diff(&Recipe::a2()).unwrap();
    assert!(
        diff.contains(&"optim.lr: 0.005 -> 0.004".to_string()),
        "{diff:?}"
    );
    assert_eq!(diff.len(), 7, "{diff:?}");

    // Optional keys can be added back after removal.
    let mut no_thr = Recipe::a1();
    no_thr.loss.target_threshold = None;
    let r = no_thr
        .with_overrides(&["loss.target_threshold=0.3"])
        .unwrap();
    assert_eq!(r.loss.target_threshold, Some(0.3));
}

#[test]
fn override_errors_name_the_key() {
    let e = Recipe::a1()
        .with_overrides(&["optim.lrr=1e-3"])
        .unwrap_err();
    assert!(matches!(&e, RecipeError::UnknownKey { key, .. } if key == "optim.lrr"));
    let msg = e.to_string();
    assert!(
        msg.starts_with("--set optim.lrr: unknown key; known keys here: "),
        "{msg}"
    );
    assert!(msg.contains("lr_scaling"), "{msg}");

    let e = Recipe::a1()
        .with_overrides(&["optimizer.lr=1e-3"])
        .unwrap_err();
    assert!(e.to_string().contains("optimizer.lr"), "{e}");
    assert!(e.to_string().contains("optim"), "{e}");

    let e = Recipe::a1().with_overrides(&["optim.lr=fast"]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "--set optim.lr: expected float, found string `fast`"
    );
    let e = Recipe::a1()
        .with_overrides(&["schedule.epochs=1.5"])
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "--set schedule.epochs: expected integer, found float `1.5`"
    );
    let e = Recipe::a1().with_overrides(&["optim"]).unwrap_err();
    assert!(matches!(e, RecipeError::MalformedOverride { .. }));
    // Right type, wrong variant: caught by deserialisation.
    let e = Recipe::a1()
        .with_overrides(&["optim.name=adam"])
        .unwrap_err();
    assert!(e.to_string().contains("adam"), "{e}");

    // Overriding a whole section is a type mismatch, not a silent replacement.
    let mut tree = Recipe::a1().to_toml_value().unwrap();
    let e = apply_overrides(&mut tree, &["optim=1"]).unwrap_err();
    assert!(matches!(e, RecipeError::TypeMismatch { .. }), "{e}");
}

#[test]
fn partial_config_layers_over_a_preset() {
    let text = "[optim]\nlr = 4e-3\n\n[schedule]\ncooldown_epochs = 10\n";
    let r = Recipe::a2().merged_with_toml_str(text, "run.toml").unwrap();
    assert_eq!(r.optim.lr, 4e-3);
    assert_eq!(r.schedule.cooldown_epochs, 10);
    assert_eq!(r.diff(&Recipe::a2()).unwrap().len(), 2);

    let e = Recipe::a2()
        .merged_with_toml_str("[optim]\nbn_wd = 0\n", "run.toml")
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("run.toml optim.bn_wd: unknown key; known keys here: "),
        "{e}"
    );
    let e = Recipe::a2()
        .merged_with_toml_str("[run]\nseed = \"x\"\n", "run.toml")
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "run.toml run.seed: expected integer, found string `\"x\"`"
    );

    // A complete recipe merges to itself.
    let full = Recipe::a3().to_toml_string().unwrap();
    assert_eq!(
        Recipe::a1().merged_with_toml_str(&full, "a3.toml").unwrap(),
        Recipe::a3()
    );

    let mut r = Recipe::a1();
    r.apply_overrides(&["run.seed=7"]).unwrap();
    assert_eq!(r.run.seed, 7);
    assert!(r.apply_overrides(&["run.seed=x"]).is_err());
    assert_eq!(r.run.seed, 7);
}

#[test]
fn validate_reports_every_problem() {
    let r = Recipe::a1()
        .with_overrides(&[
            "optim.lr=-1",
            "run.micro_batch=300",
            "augment.mix_prob=1.5",
            "augment.rand_augment=\"rand-m7-foo3\"",
        ])
        .unwrap();
    let errs = r.validate().unwrap_err();
    let fields: Vec<String> = errs
        .iter()
        .map(|e| match e {
            RecipeError::Invalid { field, .. } => field.clone(),
            other => panic!("{other}"),
        })
        .collect();
    assert_eq!(
        fields,
        [
            "augment.rand_augment",
            "augment.mix_prob",
            "optim.lr",
            "schedule.min_lr",
            "run.global_batch"
        ],
        "{errs:?}"
    );
    assert!(
        errs[0]
            .to_string()
            .contains("section \"foo3\": unknown key \"foo\""),
        "{}",
        errs[0]
    );
}

#[test]
fn lr_rules() {
    let mut r = Recipe::a1();
    let (lr, line) = r.resolved_lr(1024);
    assert!((lr - 5e-3 * 0.5f64.sqrt()).abs() < 1e-15);
    assert!(line.contains("sqrt(1024/2048)"), "{line}");
    r.optim.lr_scaling = LrScaling::Linear;
    assert!((r.resolved_lr(4096).0 - 1e-2).abs() < 1e-15);
    r.optim.lr_scaling = LrScaling::None;
    let (lr, line) = r.resolved_lr(256);
    assert_eq!(lr, 5e-3);
    assert!(line.contains("none"), "{line}");
}

#[test]
fn rand_augment_strings_are_checked_by_the_loader_parser() {
    // The parser itself is tested in the loader; here: the recipe uses it and names the field.
    for name in Recipe::PRESETS {
        let r = Recipe::preset(name).unwrap();
        assert!(loader::rand_augment::RandAugmentConfig::parse(&r.augment.rand_augment).is_ok());
        assert!(r.validate().is_ok(), "{name}");
    }
    for bad in ["augmix-m5", "rand-mx", "rand-m7-inc0"] {
        let r = Recipe::a1()
            .with_overrides(&[format!("augment.rand_augment={bad}")])
            .unwrap();
        let errs = r.validate().unwrap_err();
        assert_eq!(errs.len(), 1, "{bad}: {errs:?}");
        let msg = errs[0].to_string();
        assert!(
            msg.starts_with("augment.rand_augment: ") && msg.contains(bad),
            "{bad}: {msg}"
        );
    }
    let off = Recipe::a1()
        .with_overrides(&["augment.rand_augment=\"\""])
        .unwrap();
    assert!(off.validate().is_ok());
}

#[test]
fn derived_settings() {
    let r = Recipe::a1();
    assert_eq!(r.accumulation_steps(), 8);
    assert!(r.mixup_active());
    let lamb = r.lamb_config();
    assert_eq!(lamb.betas, (0.9, 0.999));
    assert_eq!(lamb.max_grad_norm, Some(1.0));
    let bce = r.bce();
    assert_eq!(bce.target_threshold, Some(0.2));
    assert_eq!(r.train_loss(), trainer::loss::TrainLoss::Bce(bce));
    let ce = r.with_overrides(&["loss.kind=ce"]).unwrap();
    // A threshold with CE is reported by validate().
    assert!(ce.validate().is_err());
    assert_eq!(
        ce.train_loss(),
        trainer::loss::TrainLoss::Ce { smoothing: 0.1 }
    );
    let sched = r.cosine_schedule(r.resolved_lr(2048).0, 625);
    assert_eq!(sched.total_epochs(), 600);
    assert_eq!(sched.lr_at(0, 625), 1e-4);
}

/// The presets as committed TOML (`tests/golden/recipes/*.toml`, reviewed against Table 1).
/// Values are compared, not text, so TOML formatting changes do not matter; set
/// `UPDATE_RECIPES=1` to rewrite the files after an intended preset change.
#[test]
fn presets_match_committed_toml() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/recipes");
    for name in Recipe::PRESETS {
        let path = dir.join(format!("{name}.toml"));
        let preset = Recipe::preset(name).unwrap();
        if std::env::var_os("UPDATE_RECIPES").is_some() {
            std::fs::write(&path, preset.to_toml_string().unwrap()).unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            Recipe::from_toml_str(&text).unwrap(),
            preset,
            "{}",
            path.display()
        );
    }
}

#[test]
fn unverified_settings_are_logged() {
    let notes = Recipe::a1().unverified_notes();
    assert!(notes
        .iter()
        .any(|n| n.starts_with("schedule.cooldown_epochs = 0 ")));
    assert_eq!(notes.len(), 5);
}

/// The `ft` preset: DeiT's fine-tuning values (deit issue #45) over A2, and the `finetune`
/// section: absent from a recipe's TOML (and hash) while at its defaults, so runs written before
/// it existed still read and resume; settable by `--set` and a partial config; validated.
#[test]
fn the_fine_tuning_preset_and_section() {
    let ft = Recipe::preset("ft").unwrap();
    assert_eq!(ft.optim.name, OptimizerKind::Sgd);
    assert_eq!(
        (ft.optim.lr, ft.optim.reference_batch, ft.run.global_batch),
        (0.01, 768, 768)
    );
    assert_eq!(ft.optim.lr_scaling, LrScaling::Linear);
    assert_eq!(ft.optim.weight_decay, 1e-4);
    assert_eq!(ft.schedule.epochs, 1000);
    assert_eq!(
        (
            ft.schedule.warmup_epochs,
            ft.schedule.warmup_lr,
            ft.schedule.min_lr
        ),
        (5, 1e-6, 1e-5)
    );
    assert_eq!(ft.model.drop_path_rate, 0.0);
    assert_eq!(ft.data.train_size_px, 224);
    assert_eq!(ft.loss.kind, LossKind::Bce);
    assert!(ft.validate().is_ok());

    let a1 = Recipe::a1();
    assert!(!a1.to_toml_string().unwrap().contains("finetune"));
    let set = a1
        .with_overrides(&[
            "finetune.trunk_lr_scale=0.1",
            "finetune.freeze_trunk_epochs=2",
            "finetune.bn_reestimate_batches=8",
        ])
        .unwrap();
    assert_eq!(set.finetune.trunk_lr_scale, 0.1);
    assert_eq!(set.finetune.freeze_trunk_epochs, 2);
    assert_eq!(set.finetune.bn_reestimate_batches, 8);
    let text = set.to_toml_string().unwrap();
    assert!(text.contains("[finetune]"), "{text}");
    assert_eq!(Recipe::from_toml_str(&text).unwrap(), set);
    let merged = a1
        .merged_with_toml_str("[finetune]\nfreeze_trunk_epochs = 3\n", "ft.toml")
        .unwrap();
    assert_eq!(merged.finetune.freeze_trunk_epochs, 3);
    let e = a1
        .with_overrides(&["finetune.frozen=1"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("trunk_lr_scale"), "{e}");

    let bad = a1
        .with_overrides(&[
            "finetune.trunk_lr_scale=0",
            "finetune.freeze_trunk_epochs=601",
        ])
        .unwrap();
    let errs: Vec<String> = bad
        .validate()
        .unwrap_err()
        .iter()
        .map(|e| e.to_string())
        .collect();
    assert!(
        errs.iter()
            .any(|e| e.starts_with("finetune.trunk_lr_scale")),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.starts_with("finetune.freeze_trunk_epochs")),
        "{errs:?}"
    );
}
