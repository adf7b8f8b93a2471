pub mod patch;
pub mod cache;
pub mod cli;
