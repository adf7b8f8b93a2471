pub mod model;
pub mod patch;
pub mod cache;
pub mod cli;
pub mod verify;
pub mod serve;
#[cfg(feature = "python")]
pub mod hook;
