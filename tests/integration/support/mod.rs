//! What the test modules share, one file a concern; everything is re-exported here, so a
//! test module imports from `crate::support`.
//!
//! - `daemon`: the in-process `Harness` (the library daemon, its router, its store).
//! - `config`: config text: the account-table builders, the in-process accounts.
//! - `provider`: the fake provider, in process on a manual clock or served on loopback.
//! - `keys`: RSA and EC key pairs made in the test, as PEM.
//! - `tls`: a private CA and its certificates, and HTTPS in front of the fake provider
//!   that asks for client certificates (mutual TLS).
//! - `etcd`: real etcd clusters on loopback, and a gate that cuts a client off.
//! - `process`: running the real `tokend` binary: commands, children, setups, polling.

pub mod config;
pub mod daemon;
pub mod etcd;
pub mod keys;
pub mod postgres;
pub mod process;
pub mod provider;
pub mod tls;

pub use config::*;
pub use daemon::*;
pub use keys::*;
pub use process::*;
pub use provider::*;
