//! Small helpers shared by the benchmark programs (`loader-bench`, `shard-bench`).

/// The median of `values` (the upper one for an even count). Panics if empty.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// The short git revision of the working directory, or "" outside a repository.
pub fn git_rev() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The CPU model from /proc/cpuinfo, or "".
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default()
}

/// Runs a benchmark's body and turns an error into one line on stderr and exit code 2.
pub fn exit_on_error(program: &str, result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Prints the JSON object `base` with the fields of the object `extra` added (replacing fields of
/// the same name) as one line: the shape of every benchmark's output.
pub fn print_json_line(base: &serde_json::Value, extra: serde_json::Value) {
    let mut v = base.clone();
    if let (Some(v), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
        v.extend(extra.clone());
    }
    println!("{v}");
}
