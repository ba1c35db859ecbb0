//! One AFL++ binary for every target of `tools::fuzz_targets`: the target is named by the
//! `FUZZ_TARGET` environment variable (one binary links candle once instead of thirteen times;
//! AFL passes the environment through to the forkserver). `scripts/fuzz.sh TARGET SECONDS`
//! sets it and runs `cargo afl fuzz`.

use tools::fuzz_targets::{self, AllocLimit};

#[global_allocator]
static ALLOC: AllocLimit = AllocLimit;

fn main() {
    let name = std::env::var("FUZZ_TARGET").unwrap_or_default();
    let Some(target) = fuzz_targets::target(&name) else {
        let names: Vec<&str> = fuzz_targets::TARGETS.iter().map(|(n, _)| *n).collect();
        eprintln!("set FUZZ_TARGET to one of {names:?}");
        std::process::exit(2);
    };
    afl::fuzz!(|data: &[u8]| target(data));
}
