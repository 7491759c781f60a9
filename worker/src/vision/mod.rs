//! Gemma 4's vision path: image preprocessing (here) and the vision tower.

pub mod preprocess;
pub mod tower;
