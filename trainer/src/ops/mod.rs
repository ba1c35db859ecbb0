//! Custom candle operations the ResNet needs and candle lacks (CPU implementations).

pub mod avg_pool;
pub mod max_pool;

pub use avg_pool::avg_pool2d_ceil;
pub use max_pool::max_pool2d;
