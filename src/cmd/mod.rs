//! One file per subcommand; this file only dispatches. Each command first validates every
//! argument into its `Plan` (nothing runs before that), then runs it. Shared helpers live in
//! `common.rs`, which imports no command file.

mod common;

pub mod bench_matmul;
pub mod estimate;
pub mod gpus;
pub mod infer;
pub mod inspect;
pub mod plan;
pub mod presets;
pub mod scaling;
pub mod sweep;
pub mod verify;
pub mod verify_mpi;

use crate::cli::{Cli, Command};
use crate::error::Result;

/// Run the command line's subcommand; the exit code on success.
pub fn run(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Estimate(a) => estimate::run(a),
        Command::Verify(a) => verify::run(a),
        Command::Presets(a) => presets::run(a),
        Command::Sweep(a) => sweep::run(a),
        Command::BenchMatmul => bench_matmul::run(),
        Command::Inspect(a) => inspect::run(a),
        Command::Scaling(a) => scaling::run(a),
        Command::Gpus(a) => gpus::run(a),
        Command::Infer(a) => infer::run(a),
        Command::Plan(a) => plan::run(a),
    }
}
