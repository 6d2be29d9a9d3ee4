//! The cost of starting a process and doing nothing: the baseline `tokend token` is
//! compared against in `bench/run.sh` (besides `/bin/true`).

fn main() {}
