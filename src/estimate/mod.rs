//! Closed forms from a config alone: no tensors are built here.

pub mod activations;
pub mod memory;
pub mod flops;
pub mod params;

pub use params::{Component, ParamEstimate};
