//! The `tokend` binary: parse the command line, set up logging, run, map the outcome to
//! a documented exit code.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = tokend::cli::Cli::parse();
    tokend::cli::init_tracing();
    ExitCode::from(tokend::cli::dispatch(cli))
}
