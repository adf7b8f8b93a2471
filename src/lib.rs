pub mod patch;
pub mod model;
