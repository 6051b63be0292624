//! truesize: size transformer language models from a config, then prove the numbers on real
//! tensors.
//!
//! The data flows one way: `config` → `estimate` → `model` → `measure` → `verify` → `report`.

pub mod config;
pub mod dtype;
pub mod error;
pub mod estimate;
pub mod model;
pub mod units;
pub mod cli;
pub mod commands;
pub mod measure;
pub mod report;
pub mod verify;
pub mod verify_cmd;
