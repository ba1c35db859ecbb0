//! Custom candle operations the ResNet needs and candle lacks (CPU implementations), and the
//! channels-last layer functions of the fast path ([`nhwc`]) with their CPU kernels ([`cpu`]).

pub mod avg_pool;
pub mod cpu;
pub mod gelu;
pub mod max_pool;
pub mod nhwc;
pub mod rows;
pub mod silu;

pub use avg_pool::avg_pool2d_ceil;
pub use gelu::gelu;
pub use max_pool::max_pool2d;
pub use rows::{layer_norm, softmax_last_dim};
pub use silu::silu;

/// The activation a fused kernel applies last (the evaluation conv + BatchNorm).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// None: the value as it is.
    Identity,
    /// `max(0, v)`.
    Relu,
    /// `v * sigmoid(v)` (SiLU / Swish).
    Silu,
}

/// The elements of a contiguous CPU operand (its layout's range of `v`); an error naming `what`
/// otherwise.
pub(crate) fn contiguous_slice<'a, T>(
    v: &'a [T],
    layout: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}
