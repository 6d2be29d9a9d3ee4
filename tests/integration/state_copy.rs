//! `tokend state copy`: a stopped daemon's state directory moves into another store (here
//! another directory; the code path is the same for every backend) with every record,
//! pending handoff and spent refresh token, or nothing at all; the directory is marked
//! so that no tokend refreshes its chains again, and a copy cut short completes when run
//! again. The real binary does the copying; the library's store reads what it wrote.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, UNIX_EPOCH};

use tempfile::TempDir;
use tokend::config::AccountName;
use tokend::seal::{Keyring, SealKey};
use tokend::secret::Secret;
use tokend::store::{
    AccessToken, FileStore, Handoff, NewChain, SpentKind, State, Store, StoreError, moved_path,
    peek_state, spent_fingerprint,
};

use crate::support::*;

const KEY: &str = "4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b";
const OTHER_KEY: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";

fn name(s: &str) -> AccountName {
    AccountName::parse(s).unwrap()
}

fn keyring(hex: &str) -> Keyring {
    Keyring {
        current: SealKey::parse(&Secret::new(hex)).unwrap(),
        previous: Vec::new(),
    }
}

/// A chain holding `rt`, refreshed once, remembering `rotated` as rotated away.
fn chain(rt: &str, rotated: &str) -> State {
    let at = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let mut state = State {
        refresh_token: Some(Secret::new(rt)),
        refresh_token_issued_at: Some(at),
        access: Some(AccessToken {
            token: Secret::new(format!("at-of-{rt}")),
            token_type: "Bearer".into(),
            expires_at: at + Duration::from_secs(3600),
            scope: None,
            issued_at: at,
        }),
        last_refresh: Some(at),
        ..State::default()
    };
    state.remember_spent(&Secret::new(rotated));
    state
}

/// A temp dir with the state directory to copy (`src`), the target (`dst`) and configs.
struct World {
    tmp: TempDir,
}

impl World {
    fn new() -> World {
        World {
            tmp: tempfile::tempdir().unwrap(),
        }
    }

    fn src(&self) -> PathBuf {
        self.tmp.path().join("src")
    }

    fn dst(&self) -> PathBuf {
        self.tmp.path().join("dst")
    }

    /// A config (0600) with `[state]` in `dir` sealed with `key`, and accounts `zy`, `ze`.
    fn config(&self, file: &str, dir: &Path, key: Option<&str>) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let key = key.map_or(String::new(), |k| format!("encryption_key = \"{k}\"\n"));
        let text = format!(
            "[server]\nlisten = [\"127.0.0.1:{}\"]\n\n[state]\ndir = \"{}\"\n{key}{}{}",
            free_port(),
            dir.display(),
            refresh_token_account("zy", TOKEN_URL, "zy-client", "s", "seed-zy", ""),
            account("ze", "refresh_token", TOKEN_URL, "ze-client", "s", ""),
        );
        let path = self.tmp.path().join(file);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    /// What a daemon on `src` left: `zy` rotated away from its spent seed; `ze` with a
    /// token from `tokend import` waiting as a handoff; `gone`, no longer configured.
    async fn fill_source(&self, key: Option<&str>) {
        let store = FileStore::open_sealed(&self.src(), key.map(keyring)).unwrap();
        let seed = spent_fingerprint(&Secret::new("seed-zy"));
        store
            .record_spent(&name("zy"), &seed, SpentKind::Seed)
            .await
            .unwrap();
        store
            .save(&name("zy"), &chain("rt-zy-2", "seed-zy"))
            .await
            .unwrap();
        store
            .save(&name("ze"), &chain("rt-ze-1", "rt-ze-0"))
            .await
            .unwrap();
        store.put_handoff(&name("ze"), &imported()).await.unwrap();
        let handed = spent_fingerprint(&Secret::new("rt-ze-import"));
        store
            .record_spent(&name("ze"), &handed, SpentKind::Handover)
            .await
            .unwrap();
        store
            .save(&name("gone"), &chain("rt-gone", "rt-gone-0"))
            .await
            .unwrap();
    }
}

fn imported() -> Handoff {
    Handoff::RefreshToken(NewChain::untried(Secret::new("rt-ze-import")))
}

async fn copy(from: &Path, to_config: &Path) -> Output {
    let mut cmd = tokend();
    cmd.args(["state", "copy", "--from"])
        .arg(format!("file:{}", from.display()))
        .arg("--to-config")
        .arg(to_config);
    run_cmd(&mut cmd, EXIT_TIMEOUT).await
}

/// Asserts that the target holds every record, handoff and spent token of the source.
async fn assert_copied(world: &World, key: Option<&str>) {
    let keys = key.map(keyring);
    let target = FileStore::open_sealed(&world.dst(), keys.clone()).unwrap();
    for account in ["zy", "ze"] {
        let source = peek_state(&world.src(), keys.as_ref(), &name(account)).unwrap();
        assert_eq!(
            target.load(&name(account)).await.unwrap(),
            source,
            "{account}"
        );
    }
    assert_eq!(target.load(&name("gone")).await.unwrap(), None);
    assert_eq!(
        target.load_handoff(&name("ze")).await.unwrap(),
        Some(imported())
    );
    // The spent seed stays spent: a daemon on the target will not present it again.
    let seed = target
        .spent(&spent_fingerprint(&Secret::new("seed-zy")))
        .await
        .unwrap()
        .expect("the spent seed is in the target's ledger");
    assert_eq!((seed.account, seed.kind), (name("zy"), SpentKind::Seed));
    let handed = target
        .spent(&spent_fingerprint(&Secret::new("rt-ze-import")))
        .await
        .unwrap()
        .expect("the handed-over token is in the target's ledger");
    assert_eq!(
        (handed.account, handed.kind),
        (name("ze"), SpentKind::Handover)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_arrives_and_no_tokend_uses_the_source_again() {
    let world = World::new();
    world.fill_source(Some(KEY)).await;
    let to_config = world.config("new.toml", &world.dst(), Some(KEY));

    let out = copy(&world.src(), &to_config).await;
    let f = expect_code(&out, 0);
    assert!(
        f.stdout
            .contains("copied 2 records, 1 pending handoffs and 2 spent refresh tokens"),
        "{}",
        f.stdout
    );
    assert!(
        f.stdout.contains("nothing was sent to any provider"),
        "{}",
        f.stdout
    );
    let marker = moved_path(&world.src());
    assert!(
        f.stdout.contains(&format!("delete {}", marker.display())),
        "the way back is named: {}",
        f.stdout
    );
    assert!(
        f.stderr.contains("gone.json is not copied"),
        "an account the new config lacks is named: {}",
        f.stderr
    );
    assert_copied(&world, Some(KEY)).await;

    // The source is marked: the store refuses it, naming where its chains went.
    let err = FileStore::open(&world.src()).err().expect("refused");
    let StoreError::Moved { to, .. } = &err else {
        panic!("expected Moved, got {err}")
    };
    assert!(to.contains(&world.dst().display().to_string()), "{to}");

    // A daemon started on it by mistake refuses to start, naming the target.
    let old_config = world.config("old.toml", &world.src(), Some(KEY));
    let out = run_cmd(
        tokend().arg("run").arg("--config").arg(&old_config),
        READY_TIMEOUT,
    )
    .await;
    let f = expect_code(&out, 1);
    assert!(f.stderr.contains("tokend state copy"), "{}", f.stderr);
    assert!(
        f.stderr.contains(&world.dst().display().to_string()),
        "the target is named: {}",
        f.stderr
    );

    // A second copy is refused too; deleting the marker is the way back.
    let f = expect_code(&copy(&world.src(), &to_config).await, 1);
    assert!(f.stderr.contains("was copied to"), "{}", f.stderr);
    std::fs::remove_file(&marker).unwrap();
    FileStore::open_sealed(&world.src(), Some(keyring(KEY))).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_daemon_an_occupied_target_or_a_wrong_key_copies_nothing() {
    let world = World::new();
    world.fill_source(None).await;
    let to_config = world.config("new.toml", &world.dst(), None);

    // The lock a daemon holds on the source.
    let daemon = FileStore::open(&world.src()).unwrap();
    let f = expect_code(&copy(&world.src(), &to_config).await, 1);
    assert!(f.stderr.contains("stop the daemon first"), "{}", f.stderr);
    assert!(
        f.stderr.contains(&format!("pid {}", std::process::id())),
        "{}",
        f.stderr
    );
    assert!(!world.dst().exists(), "the target was not even opened");
    drop(daemon);

    // The target holds another chain of zy: never overwritten.
    let theirs = chain("rt-theirs", "rt-theirs-0");
    {
        let target = FileStore::open(&world.dst()).unwrap();
        target.save(&name("zy"), &theirs).await.unwrap();
    }
    let f = expect_code(&copy(&world.src(), &to_config).await, 1);
    assert!(
        f.stderr
            .contains("zy: the target already holds a refresh token")
            && f.stderr.contains("nothing was copied"),
        "{}",
        f.stderr
    );
    // A record the new config's keys cannot open is named, and stops the copy too.
    let sealed = world.config("sealed.toml", &world.dst(), Some(OTHER_KEY));
    let keyed = World::new();
    keyed.fill_source(Some(KEY)).await;
    let f = expect_code(&copy(&keyed.src(), &sealed).await, 1);
    assert!(
        f.stderr.contains("account ze") || f.stderr.contains("account zy"),
        "the account is named: {}",
        f.stderr
    );
    assert!(f.stderr.contains("state.encryption_key"), "{}", f.stderr);

    let target = FileStore::open(&world.dst()).unwrap();
    assert_eq!(target.load(&name("zy")).await.unwrap(), Some(theirs));
    assert_eq!(target.load(&name("ze")).await.unwrap(), None);
    assert_eq!(target.load_handoff(&name("ze")).await.unwrap(), None);
    let seed = spent_fingerprint(&Secret::new("seed-zy"));
    assert_eq!(target.spent(&seed).await.unwrap(), None);
    assert!(!moved_path(&world.src()).exists());
    assert!(!moved_path(&keyed.src()).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_cut_short_completes_when_run_again() {
    let world = World::new();
    world.fill_source(None).await;
    let to_config = world.config("new.toml", &world.dst(), None);
    // What a copy killed midway left: the ledger and zy's record, no marker.
    {
        let target = FileStore::open(&world.dst()).unwrap();
        let seed = spent_fingerprint(&Secret::new("seed-zy"));
        target
            .record_spent(&name("zy"), &seed, SpentKind::Seed)
            .await
            .unwrap();
        let zy = peek_state(&world.src(), None, &name("zy"))
            .unwrap()
            .unwrap();
        target.save(&name("zy"), &zy).await.unwrap();
    }

    let f = expect_code(&copy(&world.src(), &to_config).await, 0);
    assert!(
        f.stdout.contains(
            "copied 1 records, 1 pending handoffs and 1 spent refresh tokens (1 already there)"
        ),
        "{}",
        f.stdout
    );
    assert_copied(&world, None).await;
    assert!(moved_path(&world.src()).exists());
}
