//! The `tokend` binary: parse the command line, run, map the outcome to a documented
//! exit code (see `tokend::cli::exit`).

#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    match tokend::cli::parse() {
        Ok(cli) => ExitCode::from(tokend::cli::dispatch(cli)),
        Err(code) => ExitCode::from(code),
    }
}
