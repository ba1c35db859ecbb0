//! Reading `metrics.jsonl`: JSON lines as the trainer writes them. A line with `top1`, `top5` or
//! `val_loss` is an evaluation (plotted against `epoch`, and `val_loss` against `step` in the
//! loss panel when it has one); any other line with `loss` or `lr` is a training step (plotted
//! against `step`, or its position among the training lines if it has none). Missing fields,
//! `null`, `NaN` and infinities (Python's `json.dumps` writes bare `NaN`) become NaN, which the
//! plots draw as gaps; lines that are not JSON objects are counted and skipped. `loss` is read
//! as written (the trainer's window mean); other fields, such as `loss_last`, are ignored.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// One training line.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainPoint {
    /// Optimiser step (x axis).
    pub step: f64,
    /// Training loss, NaN if missing.
    pub loss: f64,
    /// Learning rate, NaN if missing.
    pub lr: f64,
}

/// One evaluation line.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalPoint {
    /// Epoch (x axis of the accuracy panel).
    pub epoch: f64,
    /// Step, NaN if missing (x of `val_loss` in the loss panel).
    pub step: f64,
    /// Top-1 accuracy, NaN if missing.
    pub top1: f64,
    /// Top-5 accuracy, NaN if missing.
    pub top5: f64,
    /// Validation loss, NaN if missing.
    pub val_loss: f64,
}

/// The parsed contents of a metrics file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metrics {
    /// Training lines, in file order.
    pub train: Vec<TrainPoint>,
    /// Evaluation lines, in file order.
    pub eval: Vec<EvalPoint>,
    /// Non-empty lines that are not JSON objects (skipped).
    pub num_bad_lines: usize,
}

fn field(v: &serde_json::Value, name: &str) -> f64 {
    v.get(name)
        .and_then(serde_json::Value::as_f64)
        .filter(|x| x.is_finite())
        .unwrap_or(f64::NAN)
}

/// Replaces the bare `NaN`, `Infinity` and `-Infinity` that Python's `json` writes by `null`.
fn python_nan_to_null(line: &str) -> String {
    line.replace("-Infinity", "null")
        .replace("Infinity", "null")
        .replace("NaN", "null")
}

/// Parses metrics JSON lines (see the module docs).
pub fn parse_metrics(text: &str) -> Metrics {
    let mut m = Metrics::default();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let v: serde_json::Value = match serde_json::from_str(line)
            .or_else(|_| serde_json::from_str(&python_nan_to_null(line)))
        {
            Ok(v @ serde_json::Value::Object(_)) => v,
            _ => {
                m.num_bad_lines += 1;
                continue;
            }
        };
        let has = |k: &str| v.get(k).is_some();
        if has("top1") || has("top5") || has("val_loss") {
            let epoch = field(&v, "epoch");
            m.eval.push(EvalPoint {
                epoch: if epoch.is_nan() {
                    m.eval.len() as f64
                } else {
                    epoch
                },
                step: field(&v, "step"),
                top1: field(&v, "top1"),
                top5: field(&v, "top5"),
                val_loss: field(&v, "val_loss"),
            });
        } else if has("loss") || has("lr") {
            let step = field(&v, "step");
            m.train.push(TrainPoint {
                step: if step.is_nan() {
                    m.train.len() as f64
                } else {
                    step
                },
                loss: field(&v, "loss"),
                lr: field(&v, "lr"),
            });
        }
    }
    m
}

/// Reads a metrics file (see the module docs).
pub fn read_metrics(path: &Path) -> Result<Metrics> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(parse_metrics(&text))
}

/// The metrics file of a `plot-metrics` input: `input/metrics.jsonl` for a run directory, else
/// `input` itself.
pub fn metrics_path(input: &Path) -> PathBuf {
    if input.is_dir() {
        input.join("metrics.jsonl")
    } else {
        input.to_owned()
    }
}

/// The default legend label of a run: the name of its run directory (`input` itself when it is
/// a directory, else the directory holding the file), or the file's stem when that has no name.
pub fn run_label(input: &Path) -> String {
    let dir = if input.is_dir() {
        input
    } else {
        input.parent().unwrap_or(Path::new(""))
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    // `canonicalize` names "." and ".."; a directory that does not exist keeps its given name.
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    dir.file_name()
        .or_else(|| input.file_stem())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| input.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_python_nan_missing_fields_and_skips_garbage() {
        let m = parse_metrics(
            "{\"epoch\": 0, \"step\": 1, \"loss\": NaN, \"lr\": 0.001}\n\
             {\"epoch\": 0, \"loss\": 2.5}\n\
             not json\n\
             [1, 2]\n\
             \n\
             {\"epoch\": 0, \"step\": 2, \"top1\": 10.5, \"top5\": null, \"val_loss\": 2.0}\n\
             {\"epoch\": 1}\n",
        );
        assert_eq!(m.num_bad_lines, 2);
        assert_eq!(m.train.len(), 2);
        assert!(m.train[0].loss.is_nan());
        assert_eq!(m.train[0].lr, 0.001);
        assert_eq!(
            m.train[1].step, 1.0,
            "no step: position among training lines"
        );
        assert!(m.train[1].lr.is_nan());
        assert_eq!(m.eval.len(), 1);
        assert_eq!(m.eval[0].top1, 10.5);
        assert!(m.eval[0].top5.is_nan());
    }

    #[test]
    fn loss_is_the_written_loss_and_loss_last_is_ignored() {
        let m = parse_metrics("{\"step\": 3, \"loss\": 2.0, \"loss_last\": 9.0, \"lr\": 1e-3}\n");
        assert_eq!(
            m.train,
            [TrainPoint {
                step: 3.0,
                loss: 2.0,
                lr: 1e-3
            }]
        );
    }

    #[test]
    fn inputs_are_run_dirs_or_files_and_labels_name_the_run_dir() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("a2-seed1");
        std::fs::create_dir(&run).unwrap();
        let file = run.join("metrics.jsonl");
        std::fs::write(&file, "").unwrap();
        assert_eq!(metrics_path(&run), file);
        assert_eq!(metrics_path(&file), file);
        assert_eq!(run_label(&run), "a2-seed1");
        assert_eq!(run_label(&file), "a2-seed1");
        // A file that does not exist (yet): still named after its directory.
        assert_eq!(run_label(Path::new("/runs/a1/metrics.jsonl")), "a1");
        assert_eq!(run_label(Path::new("/metrics.jsonl")), "metrics");
    }
}
