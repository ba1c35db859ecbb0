//! The plots end to end: files in, PNGs out, through the library and the `plot-metrics` binary.
//! Set `PLOT_TEST_OUT=DIR` to keep the PNGs (in DIR/<test name>/) for a look.

use std::path::Path;
use std::process::Command;

use image::RgbImage;
use tools::plot::{
    plot_metrics, plot_resolution_sweep, plot_runs, plot_seed_histogram, read_metrics, run_colour,
    SweepPoint, FIGURE_HEIGHT_PX, FIGURE_WIDTH_PX, HEIGHT_PX, WIDTH_PX,
};

const PLOT: &str = env!("CARGO_BIN_EXE_plot-metrics");

/// `epochs` x 20 steps and an evaluation per epoch; `shift` separates overlaid runs.
fn metrics_text(epochs: usize, shift: f64) -> String {
    let mut text = String::new();
    for epoch in 0..epochs {
        for s in 0..20 {
            let step = epoch * 20 + s;
            let loss = 2.0 * (-(step as f64) / 40.0).exp() + 0.3 + shift;
            let lr = 1e-3 * (1.0 + shift) * (1.0 - step as f64 / (20 * epochs) as f64);
            text += &format!("{{\"epoch\":{epoch},\"step\":{step},\"loss\":{loss},\"lr\":{lr}}}\n");
        }
        let top1 = 20.0 + 10.0 * epoch as f64 - 8.0 * shift;
        text += &format!(
            "{{\"epoch\":{epoch},\"step\":{},\"top1\":{top1},\"top5\":{},\"val_loss\":{}}}\n",
            (epoch + 1) * 20,
            top1 + 25.0,
            1.8 - 0.2 * epoch as f64 + shift
        );
    }
    text
}

/// Where a test writes: `$PLOT_TEST_OUT/<name>` if set (kept), else a temporary directory.
struct OutDir {
    _tmp: Option<tempfile::TempDir>,
    path: std::path::PathBuf,
}

impl OutDir {
    fn new(name: &str) -> Self {
        match std::env::var_os("PLOT_TEST_OUT") {
            Some(root) => {
                let path = Path::new(&root).join(name);
                let _ = std::fs::remove_dir_all(&path);
                std::fs::create_dir_all(&path).unwrap();
                OutDir { _tmp: None, path }
            }
            None => {
                let tmp = tempfile::tempdir().unwrap();
                let path = tmp.path().to_owned();
                OutDir {
                    _tmp: Some(tmp),
                    path,
                }
            }
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

fn write_run(root: &Path, name: &str, shift: f64) -> std::path::PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("metrics.jsonl"), metrics_text(5, shift)).unwrap();
    dir
}

fn load(png: &Path) -> RgbImage {
    let bytes = std::fs::read(png).unwrap();
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG",
        png.display()
    );
    image::load_from_memory(&bytes).unwrap().into_rgb8()
}

fn count_colour(img: &RgbImage, c: [u8; 3]) -> usize {
    img.pixels().filter(|p| p.0 == c).count()
}

fn count_ink(img: &RgbImage) -> usize {
    img.pixels().filter(|p| p.0 != [255, 255, 255]).count()
}

#[test]
fn plot_metrics_writes_the_three_panels() {
    let dir = OutDir::new("plot_metrics_writes_the_three_panels");
    let run = write_run(dir.path(), "a3", 0.0);
    let jsonl = run.join("metrics.jsonl");
    std::fs::write(
        &jsonl,
        metrics_text(5, 0.0) + "garbage\n{\"step\": 7, \"loss\": NaN}\n",
    )
    .unwrap();
    let png = run.join("plot.png");
    let m = plot_metrics(&jsonl, &png).unwrap();
    assert_eq!((m.train.len(), m.eval.len(), m.num_bad_lines), (101, 5, 1));
    let img = load(&png);
    assert_eq!(img.dimensions(), (WIDTH_PX, HEIGHT_PX));
    assert!(count_ink(&img) > 20_000);
    // Training loss, lr and top-1 in blue; val loss and top-5 in orange.
    let (blue, orange) = (run_colour(0), run_colour(1));
    for panel in 0..3 {
        let (x0, x1) = (panel * WIDTH_PX / 3, (panel + 1) * WIDTH_PX / 3);
        let n = img
            .enumerate_pixels()
            .filter(|(x, _, p)| (x0..x1).contains(x) && p.0 == blue)
            .count();
        assert!(n > 200, "panel {panel}: {n} blue pixels");
    }
    assert!(count_colour(&img, orange) > 400);
}

#[test]
fn overlays_give_each_run_its_colour() {
    let dir = OutDir::new("overlays_give_each_run_its_colour");
    let runs: Vec<(String, tools::plot::Metrics)> = (0..4)
        .map(|i| {
            let run = write_run(dir.path(), &format!("seed{i}"), 0.2 * i as f64);
            (
                format!("seed {i}"),
                read_metrics(&run.join("metrics.jsonl")).unwrap(),
            )
        })
        .collect();
    let png = dir.path().join("runs.png");
    plot_runs(&runs, &png).unwrap();
    let img = load(&png);
    assert_eq!(img.dimensions(), (WIDTH_PX, HEIGHT_PX));
    for i in 0..4 {
        let n = count_colour(&img, run_colour(i));
        assert!(n > 600, "run {i}: {n} pixels of {:?}", run_colour(i));
    }
    assert_eq!(count_colour(&img, run_colour(4)), 0, "no fifth run");
    assert!(plot_runs(&[], &png).is_err());
}

#[test]
fn resolution_sweep_and_seed_histogram_write_pngs() {
    let dir = OutDir::new("resolution_sweep_and_seed_histogram_write_pngs");
    let mut points = Vec::new();
    for (k, crop) in [0.875, 1.0].into_iter().enumerate() {
        for size in (128..=320).step_by(32) {
            let d = (size as f64 - 256.0) / 64.0;
            points.push(SweepPoint {
                size,
                crop_pct: crop,
                top1: 79.0 - 2.0 * d * d - k as f64,
            });
        }
    }
    let png = dir.path().join("sweep.png");
    plot_resolution_sweep(&points, Some(224), "ResNet-50 A2: test resolution", &png).unwrap();
    let img = load(&png);
    assert_eq!(img.dimensions(), (FIGURE_WIDTH_PX, FIGURE_HEIGHT_PX));
    assert!(count_colour(&img, run_colour(0)) > 300);
    assert!(count_colour(&img, run_colour(1)) > 300);

    let values = [
        80.1, 80.4, 79.9, 80.2, 80.3, 80.0, 80.25, 80.15, 80.35, 80.05,
    ];
    let png = dir.path().join("seeds.png");
    plot_seed_histogram(&values, "ResNet-50 A2: 10 seeds", &png).unwrap();
    let img = load(&png);
    assert_eq!(img.dimensions(), (FIGURE_WIDTH_PX, FIGURE_HEIGHT_PX));
    assert!(
        count_colour(&img, run_colour(1)) > 300,
        "fitted normal curve"
    );

    // Degenerate inputs still give a PNG.
    for (i, values) in [
        &[][..],
        &[80.0][..],
        &[80.0, 80.0][..],
        &[f64::NAN, f64::NAN][..],
    ]
    .into_iter()
    .enumerate()
    {
        let png = dir.path().join(format!("seeds-degenerate-{i}.png"));
        plot_seed_histogram(values, "degenerate", &png).unwrap();
        assert!(count_ink(&load(&png)) > 300);
    }
    let png = dir.path().join("sweep-empty.png");
    plot_resolution_sweep(&[], None, "empty", &png).unwrap();
    assert!(count_ink(&load(&png)) > 300);
    // An unwritable output is an error that names it.
    let bad = dir.path().join("no-such-dir").join("x.png");
    let err = plot_seed_histogram(&values, "t", &bad).unwrap_err();
    assert!(format!("{err:#}").starts_with(&format!("writing {}", bad.display())));
}

fn run(args: &[&str], cwd: &Path) -> std::process::Output {
    Command::new(PLOT)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn plot_metrics_cli_overlays_run_directories_with_labels() {
    let dir = OutDir::new("plot_metrics_cli_overlays_run_directories_with_labels");
    let (a1, a2) = (
        write_run(dir.path(), "a1", 0.0),
        write_run(dir.path(), "a2", 0.3),
    );
    let a3 = write_run(dir.path(), "a3", 0.6).join("metrics.jsonl");
    let out = dir.path().join("cmp.png");
    let args = [
        a1.to_str().unwrap(),
        a2.to_str().unwrap(),
        a3.to_str().unwrap(),
        "--label",
        "A1",
        "--label",
        "A2",
        "--out",
        out.to_str().unwrap(),
    ];
    let res = run(&args, dir.path());
    assert!(res.status.success(), "{}", text(&res.stderr));
    assert_eq!(
        text(&res.stdout),
        format!(
            "A1: 100 training lines, 5 evaluations\n\
             A2: 100 training lines, 5 evaluations\n\
             a3: 100 training lines, 5 evaluations\n\
             {}: 3 runs\n",
            out.display()
        )
    );
    let img = load(&out);
    for i in 0..3 {
        assert!(count_colour(&img, run_colour(i)) > 600, "run {i}");
    }

    // Several runs and no --out: runs.png in the current directory.
    let res = run(&[a1.to_str().unwrap(), a2.to_str().unwrap()], dir.path());
    assert!(res.status.success(), "{}", text(&res.stderr));
    assert!(text(&res.stdout).ends_with("runs.png: 2 runs\n"));
    assert_eq!(
        load(&dir.path().join("runs.png")).dimensions(),
        (WIDTH_PX, HEIGHT_PX)
    );

    // One run directory: plot.png inside it, the one-run summary line.
    let res = run(&[a1.to_str().unwrap()], dir.path());
    assert!(res.status.success(), "{}", text(&res.stderr));
    let png = a1.join("plot.png");
    assert_eq!(
        text(&res.stdout),
        format!("{}: 100 training lines, 5 evaluations\n", png.display())
    );
    assert!(png.exists());

    // More labels than inputs.
    let res = run(
        &[a1.to_str().unwrap(), "--label", "x", "--label", "y"],
        dir.path(),
    );
    assert_eq!(res.status.code(), Some(2));
    assert_eq!(
        text(&res.stderr).trim_end(),
        "plot-metrics: error: 2 --label given for 1 inputs (the i-th --label names the i-th input)"
    );
}
