//! truesize: size transformer language models from a config, then prove the numbers on real
//! tensors.
//!
//! The data flows one way: `config` → `estimate` → `model` → `measure` → `verify` → `report`.

pub mod checkpoint;
pub mod cli;
pub mod cmd;
pub mod commands;
pub mod config;
pub mod dtype;
pub mod error;
pub mod estimate;
pub mod infer;
pub mod inspect;
pub mod measure;
pub mod model;
pub mod plan_cmd;
pub mod report;
pub mod sweep;
pub mod units;
pub mod verify;
pub mod verify_cmd;
