//! The Rust DeepSeek-OCR: config, weights (load + synth), preprocessing, vision, decoder,
//! generation, kernels. Stands on nothing of ours: it must not use `patch` or `cache`.

pub mod synth;
