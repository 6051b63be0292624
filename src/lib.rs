//! truesize: size transformer language models from a config, then prove the numbers on real
//! tensors.
//!
//! The data flows one way: `config` → `estimate` → `model` → `measure` → `check` → `report`.

pub mod check;
pub mod checkpoint;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod dtype;
pub mod error;
pub mod estimate;
pub mod family;
pub mod files;
pub mod infer;
pub mod measure;
pub mod model;
pub mod plan;
pub mod report;
pub mod train;
pub mod units;
