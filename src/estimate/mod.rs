//! Closed forms from a config alone: no tensors are built here.

pub mod memory;
pub mod params;

pub use params::{Component, ParamEstimate};
