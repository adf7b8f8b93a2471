pub mod model;
pub mod patch;
pub mod cache;
pub mod cli;
#[cfg(feature = "python")]
pub mod hook;
