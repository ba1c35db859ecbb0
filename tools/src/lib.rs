//! Library side of the command-line tools, so that tests and other tools can call them.
#![deny(missing_docs)]

pub mod alloc;
pub mod bench;
pub mod convert;
pub mod fashion_mnist;
pub mod fuzz_targets;
pub mod import;
pub mod photos;
pub mod plot;
pub mod progress;
pub mod ranks;
pub mod sharding;
pub mod sniff;
pub mod source;
pub mod sweep;
pub mod synth;

/// Every regular file under `dir`, recursively, sorted by path.
pub fn files_under(dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}
