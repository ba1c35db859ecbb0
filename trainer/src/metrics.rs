//! Accuracy and the run's metrics file (`RUN_DIR/metrics.jsonl`, one JSON object per line).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Result, Tensor};

/// For each `k` in `ks`, how many rows of `logits` have their label among the `k` largest
/// logits. A label counts as ranked `r` when `r` logits are strictly larger than its own.
///
/// # Shapes
/// `logits`: `[batch, classes]`; `labels`: `batch` values.
pub fn topk_correct(logits: &Tensor, labels: &[u32], ks: &[usize]) -> Result<Vec<u64>> {
    let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let mut correct = vec![0u64; ks.len()];
    for (row, &label) in rows.iter().zip(labels) {
        let own = row[label as usize];
        let rank = row.iter().filter(|&&v| v > own).count();
        for (c, &k) in correct.iter_mut().zip(ks) {
            if rank < k {
                *c += 1;
            }
        }
    }
    Ok(correct)
}

/// Multi-label [`topk_correct`] (ImageNet-ReaL): for each `k` in `ks`, how many rows have one
/// of their labels among the `k` largest logits (the same rank rule), counting only rows whose
/// label list is not empty. Returns the counts and the number of rows counted.
///
/// # Shapes
/// `logits`: `[batch, classes]`; `label_lists`: `batch` lists.
pub fn topk_correct_multi(
    logits: &Tensor,
    label_lists: &[&[u32]],
    ks: &[usize],
) -> Result<(Vec<u64>, u64)> {
    let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let mut correct = vec![0u64; ks.len()];
    let mut counted = 0;
    for (row, labels) in rows.iter().zip(label_lists) {
        let Some(rank) = labels
            .iter()
            .map(|&l| row.iter().filter(|&&v| v > row[l as usize]).count())
            .min()
        else {
            continue;
        };
        counted += 1;
        for (c, &k) in correct.iter_mut().zip(ks) {
            if rank < k {
                *c += 1;
            }
        }
    }
    Ok((correct, counted))
}

/// This process's resident memory in bytes (Linux: `/proc/self/statm`), `None` elsewhere.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(1) as u64)
}

/// Appends JSON lines to a metrics file, flushing after each line.
pub struct MetricsWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl MetricsWriter {
    /// Opens `path` for appending (a resumed run continues the same file).
    pub fn append(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(MetricsWriter {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        })
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one object as a line.
    pub fn write(&mut self, value: &serde_json::Value) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, value)?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn topk_counts_ranks() -> Result<()> {
        let logits = Tensor::new(
            &[
                [0.1f32, 0.9, 0.5, 0.2],
                [0.4, 0.3, 0.2, 0.1],
                [0.0, 0.1, 0.2, 0.3],
            ],
            &Device::Cpu,
        )?;
        // Row 0: label 2 has rank 1; row 1: label 0 rank 0; row 2: label 0 rank 3.
        assert_eq!(
            topk_correct(&logits, &[2, 0, 0], &[1, 2, 4])?,
            vec![1, 2, 3]
        );
        Ok(())
    }

    #[test]
    fn multi_label_topk_counts_the_best_ranked_label_and_skips_empty_lists() -> Result<()> {
        let logits = Tensor::new(
            &[
                [0.1f32, 0.9, 0.5, 0.2],
                [0.4, 0.3, 0.2, 0.1],
                [0.0, 0.1, 0.2, 0.3],
                [0.0, 0.1, 0.2, 0.3],
            ],
            &Device::Cpu,
        )?;
        // Row 0: labels {2, 1}: 1 has rank 0; row 1: no labels (not counted); row 2: {0, 2}:
        // best rank 1; row 3: {0}: rank 3.
        let lists: [&[u32]; 4] = [&[2, 1], &[], &[0, 2], &[0]];
        assert_eq!(
            topk_correct_multi(&logits, &lists, &[1, 2, 4])?,
            (vec![1, 2, 3], 3)
        );
        // Single labels give topk_correct's counts.
        let single: [&[u32]; 3] = [&[2], &[0], &[0]];
        assert_eq!(
            topk_correct_multi(&logits.narrow(0, 0, 3)?, &single, &[1, 2, 4])?.0,
            topk_correct(&logits.narrow(0, 0, 3)?, &[2, 0, 0], &[1, 2, 4])?
        );
        Ok(())
    }
}
