//! cuDNN convolutions on NHWC bf16 tensors (forward, backward data, backward filter).
