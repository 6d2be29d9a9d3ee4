//! Integration tests, one binary. Each module says what belongs in it.

mod binary;
mod crash;
mod faults;
mod flows;
mod handoff;
mod hardening;
mod layout;
mod local_attacker;
mod login;
mod logs;
mod openapi;
mod ops;
mod provider_http;
mod security;
mod support;
