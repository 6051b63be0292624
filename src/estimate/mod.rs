//! Closed forms from a config alone: no tensors are built here.

pub mod flops;
pub mod gpus;
pub mod memory;
pub mod params;
pub mod rules;
pub mod scaling;
pub mod serve;

pub use params::{Component, ParamEstimate};
