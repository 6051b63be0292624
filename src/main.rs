use clap::Parser;
use std::process::ExitCode;
use truesize::{cli::Cli, cmd};

#[global_allocator]
static ALLOC: truesize::measure::alloc::CountingAlloc = truesize::measure::alloc::CountingAlloc;

fn main() -> ExitCode {
    truesize::measure::alloc::keep_large_blocks_in_heap();
    if std::env::var_os(truesize::measure::alloc::NO_COUNT_ENV).is_some() {
        // Record that the allocator is installed, then stop counting (benchmarks only).
        truesize::measure::alloc::installed();
        truesize::measure::alloc::disable_counting();
    }
    let cli = Cli::parse();
    match cmd::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
