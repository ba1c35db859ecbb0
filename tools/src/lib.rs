//! Library side of the command-line tools, so that tests and other tools can call them.
#![deny(missing_docs)]

pub mod convert;
pub mod photos;
pub mod progress;
pub mod sharding;
pub mod sniff;
pub mod source;
pub mod synth;
