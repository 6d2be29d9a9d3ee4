//! tokend keeps OAuth 2.0 access tokens fresh for backend services and serves them on
//! loopback. Data flows one way:
//!
//! ```text
//! config ──▶ app ──▶ refresher (one task per account) ──▶ token_cell ──▶ http
//!                        │   ▲                                  ▲
//!                        ▼   │                                  │
//!                     provider (token endpoint)          readers' demands
//!                        │
//!                      store (durable state, written before a token is published)
//! ```
//!
//! - [`config`]: TOML → validated [`config::Config`]; every error names file, line, key.
//! - [`secret`]: the secret type: redacted, zeroized, one `expose()`.
//! - [`provider`]: token requests and response parsing; typed, classified errors;
//!   per-host admission; [`provider::discovery`]: endpoints from the issuer's metadata.
//! - [`schedule`]: pure timing math (refresh time, jitter, backoff).
//! - [`clock`]: wall-clock time and clock-jump detection.
//! - [`refresher`]: the per-account task: mark → call → persist → publish.
//! - [`replica`]: with a shared store (PostgreSQL, etcd), which replica refreshes which
//!   account (per-account leases) and how the others follow its commits.
//! - [`store`]: the narrow persistence interface, the atomic file store and the handoffs;
//!   [`seal`]: optional encryption of the state files.
//! - [`signing`]: the private keys that sign client assertions (PEM parsing, signing).
//! - [`sinks`]: token files and rotation hooks.
//! - [`access`]: consumers and what each may read.
//! - [`token_cell`]: the published per-account snapshot and reader demands.
//! - [`http`]: the loopback API (`router()`), its guards and errors.
//! - [`listen`]: TCP and Unix listeners, connection limits, graceful drain.
//! - [`metrics`] and [`notify`]: Prometheus metrics; systemd readiness and watchdog.
//! - [`harden`]: at daemon start, no core dumps, not dumpable, the open-file limit raised.
//! - [`app`]: wiring, signals, reload, shutdown.
//! - [`cli`]: the command line: dispatch, the client commands and their blocking API
//!   client ([`cli::client`]), the login flows ([`cli::login`]), the exit codes.
//! - [`demo`] (the default-on `demo` feature): `tokend demo` and its embedded OAuth
//!   provider, [`demo::fake_provider`], which the tests also run against.

#![forbid(unsafe_code)]

pub mod access;
pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod harden;
pub mod http;
pub mod listen;
pub mod metrics;
pub mod notify;
pub mod provider;
pub mod refresher;
pub mod replica;
pub mod schedule;
pub mod seal;
pub mod secret;
pub mod signing;
pub mod sinks;
pub mod store;
pub mod token_cell;
