//! `tokend check` as an operator reads it: each account's whole plan for the shipped
//! example configs and for one that uses every part, never a secret's value; and the
//! warnings about secret files others can read, from `check` and from `run`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::support::*;

/// `tokend check --config PATH` with `env` set, run to completion; its stdout.
async fn check(path: &Path, env: &[(&str, &str)], state_dir: &Path) -> String {
    let mut cmd = tokend();
    cmd.args(["check", "--config"]).arg(path);
    // The examples leave the state dir to systemd's StateDirectory=.
    cmd.env("STATE_DIRECTORY", state_dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run_cmd(&mut cmd, EXIT_TIMEOUT).await;
    expect_code(&out, 0).stdout
}

/// The plan's row `label` for `account` (its value), panicking with the output if none.
fn row(stdout: &str, account: &str, label: &str) -> String {
    let plan = stdout
        .split(&format!("account {account}\n"))
        .nth(1)
        .unwrap_or_else(|| panic!("no plan for account {account}:\n{stdout}"));
    plan.lines()
        .take_while(|l| l.starts_with("  "))
        .find_map(|l| l.trim_start().strip_prefix(&format!("{label}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {label} row for {account}:\n{stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_prints_the_plan_of_each_shipped_example() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let state = tempfile::tempdir().unwrap();
    let secrets = [
        ("ZYWAVE_CLIENT_SECRET", "zy-example-secret-1"),
        ("ZEPHR_CLIENT_SECRET", "zephr-example-secret-2"),
        ("EXAMPLE_API_SECRET", "cc-example-secret-3"),
    ];
    let cases = [
        (
            "zywave.toml",
            "zywave",
            "refresh_token",
            "client_secret_post, secret from env ZYWAVE_CLIENT_SECRET",
            "form (application/x-www-form-urlencoded)",
        ),
        (
            "zephr.toml",
            "zephr",
            "refresh_token",
            "client_secret_basic, secret from env ZEPHR_CLIENT_SECRET",
            "json (application/json)",
        ),
        (
            "client-credentials.toml",
            "example",
            "client_credentials",
            "client_secret_post, secret from env EXAMPLE_API_SECRET",
            "form (application/x-www-form-urlencoded)",
        ),
    ];
    for (file, account, grant, client, format) in cases {
        let stdout = check(&examples.join(file), &secrets, state.path()).await;
        assert_eq!(row(&stdout, account, "grant"), grant);
        assert!(
            row(&stdout, account, "client").ends_with(&format!("({client})")),
            "{stdout}"
        );
        assert_eq!(row(&stdout, account, "request format"), format);
        assert!(
            row(&stdout, account, "token URL").starts_with("https://"),
            "{stdout}"
        );
        for label in ["scope", "state file", "sinks", "hook", "refresh", "retries"] {
            row(&stdout, account, label);
        }
        if grant == "refresh_token" {
            assert_eq!(
                row(&stdout, account, "refresh token"),
                format!("none: needs `tokend login {account}` (or `tokend import {account}`)")
            );
        }
        for (_, secret) in secrets {
            assert!(
                !stdout.contains(secret),
                "{file}: a secret printed:\n{stdout}"
            );
        }
    }
    let zywave = check(&examples.join("zywave.toml"), &secrets, state.path()).await;
    assert_eq!(
        row(&zywave, "zywave", "headers"),
        "profile (values not shown)"
    );
    assert!(
        !zywave.contains("B 1234"),
        "a header value printed:\n{zywave}"
    );
}

/// A config that uses every part of a plan: a seed from a file others may read (a
/// warning), a stored state file, sinks, a hook, extra params, headers, an issuer to
/// discover from, an account's own refresh policy and a proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_prints_every_part_of_a_plan_and_warns_about_open_secret_files() {
    let setup = Setup::new();
    let seed_file = setup.dir.path().join("seed");
    fs::write(&seed_file, "rt-seed-in-a-file-42\n").unwrap();
    fs::set_permissions(&seed_file, fs::Permissions::from_mode(0o644)).unwrap();
    let sink = setup.dir.path().join("a.token");
    let a = refresh_token_account(
        "a",
        "http://127.0.0.1:9/token",
        "client-a",
        "cs-literal-secret-7",
        "unused",
        &format!(
            "extra_params = {{ audience = \"aud-value-secret\" }}\nheaders = {{ Profile = \"Token pt-header-secret\" }}\nsinks = [{{ path = \"{}\", format = \"json\", mode = \"0640\", on_shutdown = \"keep\" }}]\non_refresh = {{ exec = [\"/bin/true\", \"--reload\"], timeout = \"5s\" }}\n[accounts.a.refresh]\nmin_interval = \"30s\"\nmax_interval = \"6h\"\n[accounts.a.proxy]\nupstream = \"https://api.example.com/v2\"\ntimeout = \"30s\"\n",
            sink.display()
        ),
    )
    .replace(
        "refresh_token = \"unused\"",
        &format!("refresh_token = {{ file = \"{}\" }}", seed_file.display()),
    );
    let b = "\n[accounts.b]\ngrant = \"refresh_token\"\nissuer = \"https://idp.example.com\"\nclient_id = \"client-b\"\nclient_auth = \"client_secret_basic\"\nclient_secret = { env = \"B_SECRET\" }\nrequest_format = \"json\"\n";
    setup.write_config(&[a, b.to_string()]);
    fs::create_dir_all(setup.state_dir()).unwrap();
    fs::write(setup.state_file("b"), "{}").unwrap();

    let stdout = check(
        &setup.config_path(),
        &[("B_SECRET", "b-env-secret-9")],
        &setup.state_dir(),
    )
    .await;
    let seed = seed_file.display();
    assert!(
        stdout.contains(&format!(
            "warning: accounts.a.refresh_token: the secret file {seed} is readable by its group and other users (mode 644): chmod 600 {seed}"
        )),
        "{stdout}"
    );
    let expected = [
        (
            "a",
            "refresh token",
            format!("seed from file {seed} (no state file yet)"),
        ),
        (
            "a",
            "client",
            "client-a (client_secret_post, secret from the config file)".into(),
        ),
        ("a", "extra params", "audience (values not shown)".into()),
        ("a", "headers", "profile (values not shown)".into()),
        (
            "a",
            "sink",
            format!("{} (json, mode 0640, kept on shutdown)", sink.display()),
        ),
        (
            "a",
            "hook",
            r#"runs ["/bin/true", "--reload"] after each refresh, within 5s"#.into(),
        ),
        (
            "a",
            "proxy",
            "/proxy/a/… → https://api.example.com/v2/ (timeout 30s)".into(),
        ),
        (
            "b",
            "token URL",
            "discovered from https://idp.example.com at the first refresh".into(),
        ),
        (
            "b",
            "client",
            "client-b (client_secret_basic, secret from env B_SECRET)".into(),
        ),
        (
            "b",
            "refresh token",
            "the state file (stored by an earlier run)".into(),
        ),
        ("b", "sinks", "none".into()),
    ];
    for (account, label, value) in expected {
        assert_eq!(row(&stdout, account, label), value, "{account} {label}");
    }
    let refresh = row(&stdout, "a", "refresh");
    assert!(
        refresh.contains("at least 30s apart, at most 6h apart"),
        "{refresh}"
    );
    for secret in [
        "rt-seed-in-a-file-42",
        "cs-literal-secret-7",
        "aud-value-secret",
        "pt-header-secret",
        "b-env-secret-9",
    ] {
        assert!(!stdout.contains(secret), "a secret printed:\n{stdout}");
    }

    // `run` says the same at start.
    fs::remove_file(setup.state_file("b")).unwrap();
    let mut daemon = setup.start_with(|c| {
        c.env("B_SECRET", "b-env-secret-9");
    });
    daemon
        .wait_log(&format!(
            "is readable by its group and other users (mode 644): chmod 600 {seed}"
        ))
        .await;
    daemon.stop().await;
}
