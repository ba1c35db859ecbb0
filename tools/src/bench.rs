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

/// `cpu`, `cuda` (GPU 0) or `cuda:N` as a candle device; a CUDA request in a build without the `cuda` feature is
/// an error (never a silent fall back to the CPU).
pub fn parse_device(spec: &str) -> anyhow::Result<candle_core::Device> {
    use anyhow::{bail, Context};
    use candle_core::Device;
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match spec {
        "cuda" => "0",
        _ => match spec.strip_prefix("cuda:") {
            Some(o) => o,
            None => bail!("--device {spec:?}: expected cpu, cuda or cuda:N"),
        },
    };
    let ordinal: usize = ordinal
        .parse()
        .with_context(|| format!("--device {spec:?}: N must be a GPU index"))?;
    if !candle_core::utils::cuda_is_available() {
        bail!(
            "--device {spec}: this binary was built without CUDA; rebuild with \
             `cargo build --release -p tools --features cuda` (never falls back to the CPU)"
        );
    }
    open_cuda(ordinal).with_context(|| format!("--device {spec}: opening the GPU"))
}

/// GPU `ordinal`, opened as the fast path needs it (`trainer::cuda::device::open`).
#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> candle_core::Result<candle_core::Device> {
    trainer::cuda::device::open(ordinal)
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> candle_core::Result<candle_core::Device> {
    candle_core::Device::new_cuda(ordinal)
}

/// Evicts every file under `dir` from the page cache (`posix_fadvise(DONTNEED)`: no root needed;
/// pages mapped by a live process stay), so the next read comes from the disk. Returns the bytes
/// of the files.
pub fn evict_from_page_cache(dir: &std::path::Path) -> anyhow::Result<u64> {
    use anyhow::Context;
    use std::os::unix::io::AsRawFd;
    let mut bytes = 0;
    for path in crate::files_under(dir).with_context(|| format!("listing {}", dir.display()))? {
        let f =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        bytes += f.metadata()?.len();
        // SAFETY: a valid descriptor; offset 0 and length 0 mean the whole file.
        let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if r != 0 {
            anyhow::bail!("posix_fadvise({}): error {r}", path.display());
        }
    }
    Ok(bytes)
}

/// CPU time (user + system, all threads) this process has used so far, in seconds.
pub fn cpu_seconds() -> Option<f64> {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return None;
    }
    let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 * 1e-6;
    Some(secs(ru.ru_utime) + secs(ru.ru_stime))
}

/// The cores this process may run on.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
