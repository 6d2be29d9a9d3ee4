//! The `tokend` binary: parse the command line, run, map the outcome to a documented
//! exit code (see `tokend::cli::exit`).

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = tokend::cli::Cli::parse();
    ExitCode::from(tokend::cli::dispatch(cli))
}
