//! The state directory against symbolic links another local user plants: the real binary
//! is pointed through them and must refuse to start, leaving the link's target as it
//! was; links of root's (or of this user's) on the way keep working. The attacker is a
//! throwaway system user, so these tests that need one run only as root.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::*;

/// A system user made for one test and removed when dropped.
struct Attacker {
    name: String,
    uid: u32,
    gid: u32,
}

/// `useradd`/`userdel` exit codes meaning /etc/passwd or /etc/group is locked by another
/// run (tests run in parallel): worth another try.
const BUSY: [i32; 2] = [1, 10];

/// Runs `tool args`, retrying while the user database is locked (bounded); `None` when
/// the tool is missing.
fn user_tool(tool: &str, args: &[&str]) -> Option<std::process::Output> {
    for _ in 0..100 {
        let out = match Command::new(tool).args(args).output() {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => panic!("{tool}: {e}"),
        };
        if out.status.code().is_some_and(|c| BUSY.contains(&c)) {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        return Some(out);
    }
    panic!("{tool} {args:?}: the user database stayed locked");
}

impl Attacker {
    /// A new user, or `None` (with the reason printed) when this cannot be done here.
    fn create(tag: &str) -> Option<Attacker> {
        if rustix::process::geteuid().as_raw() != 0 {
            eprintln!("skipped: making a second user for the attack needs root");
            return None;
        }
        let name = format!("tokend-atk-{tag}-{}", std::process::id());
        let args = [
            "--system",
            "--no-create-home",
            "--shell",
            "/bin/false",
            &name,
        ];
        let Some(out) = user_tool("useradd", &args) else {
            eprintln!("skipped: useradd is not installed");
            return None;
        };
        // 9: the name is taken, left by an earlier run of this pid; it is ours to use.
        assert!(
            out.status.success() || out.status.code() == Some(9),
            "useradd {name}: {}",
            text(&out.stderr)
        );
        let id = |flag: &str| -> u32 {
            let out = Command::new("id").args([flag, &name]).output().expect("id");
            text(&out.stdout).trim().parse().expect("a numeric id")
        };
        Some(Attacker {
            uid: id("-u"),
            gid: id("-g"),
            name,
        })
    }

    /// `ln -s target link`, as this user.
    fn plant(&self, target: &Path, link: &Path) {
        let status = Command::new("ln")
            .arg("-s")
            .arg(target)
            .arg(link)
            .uid(self.uid)
            .gid(self.gid)
            .status()
            .expect("ln");
        assert!(
            status.success(),
            "{} could not plant {}",
            self.name,
            link.display()
        );
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        let _ = user_tool("userdel", &[&self.name]);
    }
}

/// Writes the config of `setup` with its state in `state_dir` and one account at
/// `token_url`.
fn write_config(setup: &Setup, state_dir: &Path, token_url: &str) {
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{}\"]\n\n[state]\ndir = \"{}\"\n{}",
        setup.port,
        state_dir.display(),
        svc_account("svc", token_url)
    );
    let path = setup.config_path();
    fs::write(&path, text).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
}

/// `tokend run` must exit 1 at once, saying why; its stderr.
async fn refused(setup: &Setup) -> String {
    let mut cmd = tokend();
    cmd.arg("run").arg("--config").arg(setup.config_path());
    expect_code(&run_cmd(&mut cmd, READY_TIMEOUT).await, 1).stderr
}

/// A directory's mode and sorted entry names.
fn snapshot(dir: &Path) -> (u32, Vec<String>) {
    let mode = fs::metadata(dir).unwrap().permissions().mode() & 0o7777;
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    (mode, names)
}

fn dir_with_mode(path: PathBuf, mode: u32) -> PathBuf {
    fs::create_dir(&path).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_dir_through_another_users_link_is_refused_and_its_target_untouched() {
    let Some(attacker) = Attacker::create("link") else {
        return;
    };
    let setup = Setup::new();
    // The attacker must reach the places they plant in; the real path, as messages say it.
    fs::set_permissions(setup.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let base = setup.dir.path().canonicalize().unwrap();
    let public = dir_with_mode(base.join("public"), 0o1777);
    let victim = dir_with_mode(base.join("victim"), 0o755);
    fs::write(victim.join("precious"), b"keep").unwrap();
    let theirs = dir_with_mode(base.join("theirs"), 0o755);
    std::os::unix::fs::chown(&theirs, Some(attacker.uid), Some(attacker.gid)).unwrap();
    attacker.plant(&victim, &public.join("state"));
    attacker.plant(&victim, &theirs.join("state"));
    let before = snapshot(&victim);

    // (state.dir, what the refusal must name)
    let cases = [
        (public.join("state"), public.join("state")),
        (public.join("state/sub"), public.join("state")),
        (theirs.join("state"), theirs.clone()),
    ];
    for (state_dir, named) in cases {
        write_config(&setup, &state_dir, "http://127.0.0.1:9/token");
        let stderr = refused(&setup).await;
        let named = named.display().to_string();
        assert!(stderr.contains(&named), "must name {named}: {stderr}");
        assert!(
            stderr.contains(&format!("uid {}", attacker.uid)),
            "{stderr}"
        );
        assert_eq!(snapshot(&victim), before, "the target was touched");
        assert_eq!(fs::read(victim.join("precious")).unwrap(), b"keep");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_file_that_is_a_link_is_refused_and_its_target_kept() {
    let setup = Setup::new();
    let state_dir = dir_with_mode(setup.state_dir(), 0o700);
    let target = setup.dir.path().join("precious");
    fs::write(&target, b"keep").unwrap();
    symlink(&target, state_dir.join(".lock")).unwrap();
    write_config(&setup, &state_dir, "http://127.0.0.1:9/token");
    let stderr = refused(&setup).await;
    let lock = state_dir.join(".lock").display().to_string();
    assert!(stderr.contains(&lock), "must name {lock}: {stderr}");
    assert!(stderr.contains("symbolic link"), "{stderr}");
    assert_eq!(
        fs::read(&target).unwrap(),
        b"keep",
        "the target was truncated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_dir_through_a_link_of_root_or_this_user_works() {
    let (_fake, url, _) = start_provider_with_clients().await;
    let setup = Setup::new();
    // Like a system whose /tmp (sticky, open to all) holds a link of root's.
    let public = dir_with_mode(setup.dir.path().join("public"), 0o1777);
    let real = dir_with_mode(setup.dir.path().join("real"), 0o755);
    symlink(&real, public.join("alias")).unwrap();
    write_config(&setup, &public.join("alias/state"), &url);
    let client = http_client();
    let daemon = setup.start_ready(&client).await;
    daemon.token(&client, "svc").await;
    let made = real.join("state");
    assert_eq!(snapshot(&made).0, 0o700);
    assert!(made.join("svc.json").is_file(), "{:?}", snapshot(&made).1);
    assert!(made.join(".lock").is_file());
}
