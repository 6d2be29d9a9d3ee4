//! Integration tests, one binary. Each module says what belongs in it.

mod binary;
mod chain;
mod check;
mod cli;
mod crash;
mod etcd_store;
mod exposure;
mod faults;
mod flows;
mod handoff;
mod hardening;
mod journal;
mod layout;
mod local_attacker;
mod login;
mod logs;
mod openapi;
mod ops;
mod provider_http;
mod retry_after;
mod security;
mod stop;
mod support;
mod symlinks;
