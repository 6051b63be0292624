use clap::Parser;
use std::process::ExitCode;
use truesize::{cli::Cli, cmd, error::Error, files};

#[global_allocator]
static ALLOC: truesize::measure::alloc::CountingAlloc = truesize::measure::alloc::CountingAlloc;

/// Stack of the thread that runs the command. candle's autograd walks and drops its graph
/// recursively (one frame chain per op, through every layer), so the 8 MiB main stack overflows
/// on deep models; this is address space, not memory: only the pages a run touches are used.
const COMMAND_STACK_BYTES: usize = 1 << 30;

fn main() -> ExitCode {
    truesize::measure::alloc::keep_large_blocks_in_heap();
    if std::env::var_os(truesize::measure::alloc::NO_COUNT_ENV).is_some() {
        // Record that the allocator is installed, then stop counting (benchmarks only).
        truesize::measure::alloc::installed();
        truesize::measure::alloc::disable_counting();
    }
    files::install_signal_cleanup();
    let result = match std::thread::Builder::new()
        .name("truesize".into())
        .stack_size(COMMAND_STACK_BYTES)
        .spawn(|| cmd::run(Cli::parse()))
    {
        Ok(handle) => handle.join().unwrap_or_else(|_| {
            Err(Error::Internal(anyhow::anyhow!(
                "the command panicked (a bug in truesize: please report it with the command line)"
            )))
        }),
        // Address space is limited (ulimit -v): run on the main thread's stack.
        Err(_) => cmd::run(Cli::parse()),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {}", truesize::error::printable(&e.to_string()));
            ExitCode::from(e.exit_code())
        }
    }
}
