//! The loader: from memory-mapped shards to u8 batches, deterministic and multi-threaded.
//!
//! [`plan`] decides which samples each batch holds (shuffle, ranks, repeated augmentation,
//! gradient-accumulation micro-batches); each sample's random draws come from
//! [`rng::sample_rng`]`(seed, epoch, position)`; [`sample`] decodes ([`decode`]), crops and
//! resizes ([`transform`]) into its slot of a pooled batch buffer ([`batch`]); [`pipeline`] runs
//! a fixed pool of workers and delivers batches in order. The bytes of every batch are the same
//! for any number of workers, and a run resumed from a [`LoaderState`] continues exactly.
#![deny(missing_docs)]

pub mod batch;
pub mod decode;
pub mod mix;
pub mod pipeline;
pub mod plan;
pub mod rand_augment;
pub mod rng;
pub mod sample;
pub mod transform;

pub use batch::{Batch, HostStorage, SkippedSample};
pub use decode::{DecodeOptions, DecoderKind};
pub use mix::{MixConfig, MixDraw, MixKind};
pub use pipeline::{
    EpochRun, EpochSummary, Loader, LoaderConfig, LoaderState, OnCorrupt, StageSeconds,
};
pub use plan::{EpochPlan, PlanConfig, PlannedSample};
pub use rand_augment::{RandAugment, RandAugmentConfig};
pub use sample::{Augment, Transform};

/// Loader errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A shard or index problem.
    #[error(transparent)]
    Shards(#[from] shards::Error),
    /// A sample could not be read or decoded (under [`OnCorrupt::Fail`]).
    #[error("epoch {epoch}, batch {batch_id}: split index {index}: {reason}")]
    Sample {
        /// Index in the split.
        index: u32,
        /// Batch it belonged to.
        batch_id: usize,
        /// Epoch.
        epoch: u64,
        /// What went wrong, naming shard, key and byte offset.
        reason: String,
    },
    /// A bad configuration.
    #[error("{0}")]
    Config(String),
}
