//! End-to-end tests of the real `tokend` binary.
