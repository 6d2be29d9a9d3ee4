//! Integration tests, one binary. Each module says what belongs in it.

mod binary;
mod chain;
mod check;
mod cli;
mod crash;
mod deploy_k8s;
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
mod postgres_store;
mod provider_http;
mod retry_after;
mod security;
mod state_copy;
mod stop;
mod support;
mod symlinks;
