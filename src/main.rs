use clap::Parser;
use std::process::ExitCode;
use truesize::{cli::Cli, commands};

#[global_allocator]
static ALLOC: truesize::measure::alloc::CountingAlloc = truesize::measure::alloc::CountingAlloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match commands::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
