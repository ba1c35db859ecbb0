//! Benchmarks are the binaries in `src/bin`; each prints one JSON line per measurement.
