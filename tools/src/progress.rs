//! Progress for long jobs: a bar on a terminal, a line every 30 seconds otherwise (logs).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Counts files and bytes against a known total and shows the rates and the time left.
pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    total_files: u64,
    unit: String,
    files: u64,
    bytes: u64,
    start: Instant,
    last_line: Instant,
    quiet: bool,
}

impl Progress {
    /// A progress display for `total_files` files; nothing is shown if `quiet`.
    pub fn new(label: &str, total_files: u64, quiet: bool) -> Self {
        Self::counting(label, total_files, "files", quiet)
    }

    /// A progress display for `total` things called `unit` (`"images"`); nothing is shown if
    /// `quiet`. The rate in MB/s is shown only once bytes are counted.
    pub fn counting(label: &str, total: u64, unit: &str, quiet: bool) -> Self {
        let total_files = total;
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(
                Some(total_files),
                ProgressDrawTarget::stderr_with_hz(4),
            );
            bar.set_style(
                ProgressStyle::with_template(&format!(
                    "{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit}, {{per_sec}}, {{msg}}ETA {{eta}}"
                ))
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(label.to_owned());
            bar
        });
        let now = Instant::now();
        Progress {
            bar,
            label: label.to_owned(),
            total_files,
            unit: unit.to_owned(),
            files: 0,
            bytes: 0,
            start: now,
            last_line: now,
            quiet,
        }
    }

    /// Records `files` more things (files, images) totalling `bytes` (0 when not counted).
    pub fn add(&mut self, files: u64, bytes: u64) {
        self.files += files;
        self.bytes += bytes;
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        let mb_s = self.bytes as f64 / 1e6 / secs;
        let mb_s = if self.bytes > 0 {
            format!("{mb_s:.0} MB/s, ")
        } else {
            String::new()
        };
        if let Some(bar) = &self.bar {
            bar.set_position(self.files);
            bar.set_message(mb_s);
        } else if !self.quiet && self.last_line.elapsed() >= Duration::from_secs(30) {
            self.last_line = Instant::now();
            let rate = self.files as f64 / secs;
            let left =
                (self.total_files - self.files.min(self.total_files)) as f64 / rate.max(1e-9);
            eprintln!(
                "{}: {}/{} {unit}, {rate:.0} {unit}/s, {mb_s}ETA {:.0} s",
                self.label,
                self.files,
                self.total_files,
                left,
                unit = self.unit
            );
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
