//! Ways out besides the API: token files (sinks) rewritten atomically with their mode,
//! rotation hooks fired once per refresh, `run --once` for init containers, and the
//! Zywave Profile header forms. Sinks and hooks run on the real clock (hooks are real
//! processes, which tokio's paused clock cannot wait for), bounded by polling deadlines.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokend::clock::Clock;
use tokend::config::{Config, SystemEnvironment};

use crate::support::{Harness, client_credentials_account, parse_config, provider, zywave_account};

async fn until(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sinks_follow_every_refresh_atomically_and_hooks_fire_once_each() {
    let clock = Clock::system();
    // 2 s tokens, refreshed every ~1.6 s (min_interval 1 s below).
    let fake = provider(&clock, Duration::from_secs(2));
    let seed = fake.grant_refresh_token("zy-client", None);
    let dir = tempfile::tempdir().unwrap();
    let raw_sink = dir.path().join("zy.token");
    let json_sink = dir.path().join("zy.json-sink");
    let hook_log = dir.path().join("hook.log");
    let text = format!(
        "[state]\ndir = \"{state}\"\n[refresh]\nmin_interval = \"1s\"\n{account}profile = \"B 1234\"\n\
         [[accounts.zy.sinks]]\npath = \"{raw}\"\nmode = \"0640\"\n\
         [[accounts.zy.sinks]]\npath = \"{json}\"\nformat = \"json\"\non_shutdown = \"keep\"\n\
         [accounts.zy.on_refresh]\nexec = [\"/bin/sh\", \"-c\", \"echo $TOKEND_ACCOUNT >> {log}\"]\n",
        state = dir.path().join("state").display(),
        account = zywave_account("zy", &seed).replace("headers = { Profile = \"B 1234\" }\n", ""),
        raw = raw_sink.display(),
        json = json_sink.display(),
        log = hook_log.display(),
    );
    let mut h = Harness::builder(fake.clone(), clock, dir)
        .start(parse_config(&text))
        .await;

    // A reader that never sees a missing, empty or partial token file.
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (stop, reads, path, fake) =
            (stop.clone(), reads.clone(), raw_sink.clone(), fake.clone());
        std::thread::spawn(move || {
            let mut bad = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(t) = std::fs::read_to_string(&path) {
                    reads.fetch_add(1, Ordering::Relaxed);
                    if !t.starts_with("at-") || !fake.minted().contains(&t) {
                        bad.push(t);
                    }
                }
            }
            bad
        })
    };
    let hook_runs = || {
        std::fs::read_to_string(&hook_log)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    until(Duration::from_secs(20), "four refreshes", || {
        fake.counts().refresh_grants >= 4
    })
    .await;
    until(
        Duration::from_secs(5),
        "the hooks of those refreshes",
        || hook_runs() as u64 >= fake.counts().refresh_grants - 1,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let bad = reader.join().unwrap();
    assert!(bad.is_empty(), "a reader saw a torn token file: {bad:?}");
    assert!(reads.load(Ordering::Relaxed) > 100);

    let token = std::fs::read_to_string(&raw_sink).unwrap();
    let mode = std::fs::metadata(&raw_sink).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json_sink).unwrap()).unwrap();
    assert_eq!(json["account"], "zy");
    assert_eq!(json["headers"]["Profile"], "B 1234");
    assert!(json["expires_in"].as_u64().unwrap() <= 2);
    assert!(fake.minted().contains(&token));
    assert_eq!(
        std::fs::read_to_string(&hook_log).unwrap().lines().next(),
        Some("zy")
    );

    h.shutdown().await;
    // Hooks fire once per refresh: never more runs than refreshes.
    let (runs, refreshes) = (hook_runs() as u64, fake.counts().refresh_grants);
    assert!(
        runs == refreshes || runs + 1 == refreshes,
        "{runs} hook runs for {refreshes} refreshes"
    );
    assert!(!raw_sink.exists(), "on_shutdown = remove (the default)");
    assert!(json_sink.exists(), "on_shutdown = keep");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sinks_stay_through_reloads_and_go_when_the_daemon_stops() {
    let clock = Clock::system();
    let fake = provider(&clock, Duration::from_secs(3600));
    let seed = fake.grant_refresh_token("zy-client", None);
    let dir = tempfile::tempdir().unwrap();
    let sink = dir.path().join("cc.token");
    let text = |with_cc: bool| {
        let cc = format!(
            "{}[[accounts.cc.sinks]]\npath = \"{}\"\n",
            client_credentials_account("cc"),
            sink.display()
        );
        format!(
            "[state]\ndir = \"{}\"\n{}{}",
            dir.path().join("state").display(),
            zywave_account("zy", &seed),
            if with_cc { cc.as_str() } else { "" },
        )
    };
    let (with_cc, without_cc) = (parse_config(&text(true)), parse_config(&text(false)));
    let mut h = Harness::builder(fake, clock, dir)
        .start(with_cc.clone())
        .await;
    until(Duration::from_secs(10), "the sink", || sink.exists()).await;

    // Stopping an account on reload is not stopping tokend: nothing rewrites the file
    // once the account is gone, and it stays.
    let report = h.daemon.as_mut().unwrap().reload(without_cc).await;
    assert_eq!(report.removed.len(), 1, "{report:?}");
    assert!(sink.exists(), "a reload leaves the token files");

    let report = h.daemon.as_mut().unwrap().reload(with_cc).await;
    assert_eq!(report.added.len(), 1, "{report:?}");
    h.settle(Duration::from_secs(10)).await;
    h.shutdown().await;
    assert!(!sink.exists(), "on_shutdown = remove (the default)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_token_is_served_as_a_secret_profile_header() {
    let clock = Clock::system();
    let fake = provider(&clock, Duration::from_secs(3600));
    let seed = fake.grant_refresh_token("zy-client", None);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("profile-token"), "eyJwcm9maWxl\n").unwrap();
    let text = format!(
        "[state]\ndir = \"{}\"\n{}profile_token = {{ file = \"{}\" }}\n",
        dir.path().join("state").display(),
        zywave_account("zy", &seed).replace("headers = { Profile = \"B 1234\" }\n", ""),
        dir.path().join("profile-token").display(),
    );
    let config = parse_config(&text);
    assert!(
        !format!("{config:?}").contains("eyJwcm9maWxl"),
        "the profile token is a secret"
    );
    let mut h = Harness::builder(fake, clock, dir).start(config).await;
    h.settle(Duration::from_secs(10)).await;
    let (_, json) = h.get("/v1/token/zy").await;
    assert_eq!(json["headers"]["Profile"], "Token eyJwcm9maWxl");
    h.shutdown().await;
}

#[test]
fn profile_values_are_validated() {
    let load = |extra: &str| {
        let text = format!(
            "[accounts.zy]\ngrant = \"client_credentials\"\ntoken_url = \"https://x/t\"\nclient_id = \"c\"\nclient_secret = \"s\"\n{extra}"
        );
        Config::from_str_at(&text, Path::new("p.toml"), &SystemEnvironment)
    };
    assert!(load("profile = \"B 1234\"\n").is_ok());
    for bad in ["\"1234\"", "\"B\"", "\"Token abc\"", "\"B 12 34\""] {
        let err = load(&format!("profile = {bad}\n")).unwrap_err();
        assert_eq!(err.problems[0].key, "accounts.zy.profile", "{bad}: {err}");
    }
    let err = load("profile = \"B 1\"\nheaders = { Profile = \"B 2\" }\n").unwrap_err();
    assert!(err.to_string().contains("already set"), "{err}");
    let err = load("profile = \"B 1\"\nprofile_token = \"t\"\n").unwrap_err();
    assert!(err.to_string().contains("not both"), "{err}");
    let err = load("[[accounts.zy.sinks]]\npath = \"relative.token\"\n").unwrap_err();
    assert!(err.to_string().contains("absolute"), "{err}");
    let err = load("[[accounts.zy.sinks]]\npath = \"/run/x\"\nmode = \"0666\"\n").unwrap_err();
    assert!(err.to_string().contains("0640"), "{err}");
    let err = load("[accounts.zy.on_refresh]\nsignal = \"KILL\"\npid_file = \"/run/app.pid\"\n")
        .unwrap_err();
    assert!(err.to_string().contains("HUP"), "{err}");
    let err = load("[accounts.zy.on_refresh]\nexec = [\"systemctl\"]\n").unwrap_err();
    assert!(err.to_string().contains("absolute path"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_writes_sinks_and_exits_by_outcome() {
    let fake = provider(&Clock::system(), Duration::from_secs(3600));
    let (addr, _stop) = crate::support::serve_fake(&fake).await;
    let seed = fake.grant_refresh_token("zy-client", None);
    let dir = tempfile::tempdir().unwrap();
    let sink = dir.path().join("zy.token");
    let account = zywave_account("zy", &seed)
        .replace(crate::support::TOKEN_URL, &format!("http://{addr}/token"));
    let write = |extra: &str| {
        let text = format!(
            "[state]\ndir = \"{}\"\n{account}[[accounts.zy.sinks]]\npath = \"{}\"\n{extra}",
            dir.path().join("state").display(),
            sink.display()
        );
        let path = dir.path().join("tokend.toml");
        std::fs::write(&path, text).unwrap();
        path
    };
    let run = |config: std::path::PathBuf| async move {
        let mut cmd = crate::support::tokend();
        cmd.args(["run", "--once", "--config"]).arg(&config);
        crate::support::run_cmd(&mut cmd, Duration::from_secs(60)).await
    };
    let out = run(write("")).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = std::fs::read_to_string(&sink).unwrap();
    assert!(
        fake.is_valid_access_token(&token),
        "the sink outlives the process"
    );

    let broken = "[accounts.bad]\ngrant = \"refresh_token\"\ntoken_url = \"http://127.0.0.1:1/token\"\nclient_id = \"x\"\nrefresh_token = \"rt-unknown\"\n";
    let out = run(write(broken)).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "one account without a token fails the run"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad"));
}
