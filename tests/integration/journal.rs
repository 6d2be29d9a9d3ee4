//! The real binary's logging set-up: under journald (`JOURNAL_STREAM` naming its stderr)
//! each line carries its priority, so `journalctl -p warning` works; a stderr that is not
//! the journal gets none; a bad `TOKEND_LOG_FORMAT` is a config error.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_journald_each_line_starts_with_its_priority() {
    let (fake, url, seed) = start_provider_with_clients().await;
    let setup = Setup::new();
    setup.write_config(&[zy_account("zy", &url, &seed)]);
    // Readable by others while it holds a literal secret: a warning at start.
    fs::set_permissions(setup.config_path(), fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(setup.log_path(), "").unwrap();
    let log = fs::metadata(setup.log_path()).unwrap();
    let client = http_client();

    // stderr is the stream JOURNAL_STREAM names (as systemd sets it up).
    let stream = format!("{}:{}", log.dev(), log.ino());
    let mut daemon = setup.start_with(|c| {
        c.env("JOURNAL_STREAM", &stream);
    });
    daemon.wait_ready(&client).await;
    let status = daemon.stop().await;
    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.log());
    let journal = daemon.log();
    let lines: Vec<&str> = journal.lines().filter(|l| !l.is_empty()).collect();
    assert!(lines.len() >= 4, "{journal}");
    for line in &lines {
        let prefix = line.get(..3).unwrap_or("");
        assert!(
            ["<3>", "<4>", "<6>", "<7>"].contains(&prefix),
            "a line without its priority: {line:?}\n{journal}"
        );
        assert!(!line.contains('\x1b'), "ANSI colours: {line:?}");
    }
    let line_with = |needle: &str| {
        *lines
            .iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in:\n{journal}"))
    };
    // No timestamp of its own: the journal adds one.
    assert!(line_with("tokend started").starts_with("<6>INFO "));
    assert!(line_with("holds a literal secret").starts_with("<4>WARN "));

    // Started again with stderr elsewhere than the stream named (a child of a service,
    // redirected): plain lines.
    let before = journal.len();
    let mut daemon = setup.start_with(|c| {
        c.env("JOURNAL_STREAM", "1:1");
    });
    daemon.wait_ready(&client).await;
    let status = daemon.stop().await;
    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.log());
    let plain = daemon.log()[before..].to_string();
    assert!(plain.contains("tokend started"), "{plain}");
    assert!(
        plain.lines().all(|l| !l.starts_with('<')),
        "a priority on a stderr that is not the journal:\n{plain}"
    );

    let counts = fake.counts();
    assert_eq!(counts.reuse_detected, 0, "{counts:?}");
    assert_eq!(counts.forks, 0, "{counts:?}");
    assert_eq!(fake.live_refresh_tokens("zy-client"), 1, "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_log_format_in_the_environment_is_a_config_error() {
    let setup = Setup::new();
    setup.write_config(&[svc_account("svc", "http://127.0.0.1:9/token")]);
    let out = run_cmd(
        tokend()
            .arg("run")
            .arg("--config")
            .arg(setup.config_path())
            .env("TOKEND_LOG_FORMAT", "yaml"),
        Duration::from_secs(10),
    )
    .await;
    let stderr = expect_code(&out, 78).stderr;
    assert!(stderr.contains("TOKEND_LOG_FORMAT=\"yaml\""), "{stderr}");
    assert!(stderr.contains("\"text\" or \"json\""), "{stderr}");
    assert!(!setup.state_dir().exists(), "it started anyway");
}
