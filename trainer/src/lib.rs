//! The training side of the ResNet strikes back port, in candle.
//!
//! Everything here runs on the CPU; CUDA specifics sit behind the `cuda` feature.
#![deny(missing_docs)]

pub mod backend;
pub mod batch_aug;
pub mod checkpoint;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod disk_cache;
pub mod dist;
pub mod feed;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod optim;
pub mod recipe;
pub mod schedule;
pub mod train;
pub mod transfer;
pub mod weights;
