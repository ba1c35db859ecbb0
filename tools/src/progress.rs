//! Progress for long jobs: a bar on a terminal, a line every 30 seconds otherwise (logs).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Counts files and bytes against a known total and shows the rates and the time left.
pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    total_files: u64,
    files: u64,
    bytes: u64,
    start: Instant,
    last_line: Instant,
    quiet: bool,
}

impl Progress {
    /// A progress display for `total_files` files; nothing is shown if `quiet`.
    pub fn new(label: &str, total_files: u64, quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(
                Some(total_files),
                ProgressDrawTarget::stderr_with_hz(4),
            );
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} files, {per_sec}, {msg}, ETA {eta}",
                )
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
            files: 0,
            bytes: 0,
            start: now,
            last_line: now,
            quiet,
        }
    }

    /// Records `files` more files totalling `bytes`.
    pub fn add(&mut self, files: u64, bytes: u64) {
        self.files += files;
        self.bytes += bytes;
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        let mb_s = self.bytes as f64 / 1e6 / secs;
        if let Some(bar) = &self.bar {
            bar.set_position(self.files);
            bar.set_message(format!("{mb_s:.0} MB/s"));
        } else if !self.quiet && self.last_line.elapsed() >= Duration::from_secs(30) {
            self.last_line = Instant::now();
            let rate = self.files as f64 / secs;
            let left =
                (self.total_files - self.files.min(self.total_files)) as f64 / rate.max(1e-9);
            eprintln!(
                "{}: {}/{} files, {rate:.0} files/s, {mb_s:.0} MB/s, ETA {:.0} s",
                self.label, self.files, self.total_files, left
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
