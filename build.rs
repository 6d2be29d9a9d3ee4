//! Build information for `tokend --version`: the git commit when built from a checkout.

use std::process::Command;

fn main() {
    // TOKEND_GIT_COMMIT wins: builds from a source tree without .git (containers) can
    // still say what they are.
    println!("cargo:rerun-if-env-changed=TOKEND_GIT_COMMIT");
    let commit = std::env::var("TOKEND_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=TOKEND_GIT_COMMIT={commit}");
    println!(
        "cargo:rustc-env=TOKEND_TARGET={}",
        std::env::var("TARGET").unwrap_or_default()
    );
    println!(
        "cargo:rustc-env=TOKEND_PROFILE={}",
        std::env::var("PROFILE").unwrap_or_default()
    );
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs");
}
