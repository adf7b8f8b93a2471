pub mod model;
pub mod patch;
