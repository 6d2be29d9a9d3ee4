//! Integration tests, one binary. Each module says what belongs in it.

mod binary;
mod faults;
mod flows;
mod harness;
