//! The file store's ledger of spent refresh tokens: an append-only log in the state
//! directory, one JSON line per token presented (a seed, a handed-over token), loaded into
//! memory at open, each append fdatasync'd, a torn last line cut off, compacted when it grows.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::atomic::write_atomically;
use super::safe_path::{open_no_follow, read_no_follow};
use super::wire::{from_unix, to_unix};
use super::{Spent, SpentKind};
use crate::config::AccountName;
use crate::secret::Secret;

/// The ledger's file in the state directory. Not `*.json`: it is no account's state.
pub const LEDGER_FILE: &str = "spent-refresh-tokens.log";

/// Entries kept per account (its seeds and handed-over tokens; a handful in a lifetime):
/// beyond this, compaction drops the account's oldest.
const PER_ACCOUNT: usize = 64;
/// Entries kept in all, oldest dropped first: 100,000 lines of ~110 bytes.
const MAX_ENTRIES: usize = 100_000;
/// Superseded lines tolerated before the log is rewritten.
const SLACK_LINES: usize = 1024;

/// The ledger's name for a refresh token: 128 bits of a domain-separated SHA-256. Longer
/// than [`Secret::fingerprint`] (48 bits, for logs) because a collision here refuses a
/// good token, and the ledger gathers entries for as long as the state directory lives.
pub fn spent_fingerprint(token: &Secret) -> String {
    let mut h = Sha256::new();
    h.update(b"tokend spent refresh token\0");
    h.update(token.expose().as_bytes());
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    fp: String,
    account: String,
    at: u64,
    kind: SpentKind,
}

/// The ledger: the entries in memory (looked up without touching the disk) and the log.
pub(super) struct Ledger {
    entries: Mutex<HashMap<String, Spent>>,
    log: Mutex<Log>,
}

struct Log {
    dir: PathBuf,
    /// Opened for appending at the first append: a store that never records one has no
    /// ledger file.
    file: Option<File>,
    /// Lines in the file, superseded ones included.
    lines: usize,
}

impl Ledger {
    /// Loads the log of `dir` (none yet is an empty ledger). A torn last line (a crash
    /// mid-append) is cut off; it recorded nothing yet presented.
    pub(super) fn open(dir: &Path) -> io::Result<Ledger> {
        let path = dir.join(LEDGER_FILE);
        let (entries, lines, good_len) = read_log(&path)?;
        if fs::metadata(&path).is_ok_and(|m| m.len() > good_len) {
            let file = open_no_follow(OpenOptions::new().write(true), &path)?;
            file.set_len(good_len)?;
            file.sync_data()?;
        }
        Ok(Ledger {
            entries: Mutex::new(entries),
            log: Mutex::new(Log {
                dir: dir.to_path_buf(),
                file: None,
                lines,
            }),
        })
    }

    pub(super) fn get(&self, fingerprint: &str) -> Option<Spent> {
        self.entries().get(fingerprint).cloned()
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Spent>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `records` durably (one write, one fdatasync), then compacts if due.
    /// Blocking.
    pub(super) fn append(&self, records: Vec<(String, Spent)>) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let mut text = String::new();
        for (fp, spent) in &records {
            text.push_str(&line(fp, spent));
        }
        log.file()?.write_all(text.as_bytes())?;
        log.file()?.sync_data()?;
        log.lines += records.len();
        let snapshot = {
            let mut entries = self.entries();
            entries.extend(records);
            let due = log.lines > 2 * entries.len() + SLACK_LINES
                || entries.len() > MAX_ENTRIES
                || over_account_cap(&entries, 2 * PER_ACCOUNT);
            due.then(|| entries.clone())
        };
        if let Some(mut kept) = snapshot {
            bound(&mut kept);
            log.rewrite(&kept)?;
            *self.entries() = kept;
        }
        Ok(())
    }

    /// Every entry, oldest first (`tokend state copy` carries them to another store).
    pub(super) fn all(&self) -> Vec<(String, Spent)> {
        let mut all: Vec<_> = self
            .entries()
            .iter()
            .map(|(fp, s)| (fp.clone(), s.clone()))
            .collect();
        all.sort_by(|a, b| (a.1.at, &a.0).cmp(&(b.1.at, &b.0)));
        all
    }

    /// `from`'s entries, to be appended again under `to` (a rename).
    pub(super) fn moved(&self, from: &AccountName, to: &AccountName) -> Vec<(String, Spent)> {
        self.entries()
            .iter()
            .filter(|(_, s)| &s.account == from)
            .map(|(fp, s)| {
                let mut s = s.clone();
                s.account = to.clone();
                (fp.clone(), s)
            })
            .collect()
    }
}

impl Log {
    fn file(&mut self) -> io::Result<&mut File> {
        if self.file.is_none() {
            let path = self.dir.join(LEDGER_FILE);
            let created = !path.exists();
            let file = open_no_follow(
                OpenOptions::new().create(true).append(true).mode(0o600),
                &path,
            )?;
            if created {
                super::atomic::sync_dir(&self.dir)?;
            }
            self.file = Some(file);
        }
        Ok(self.file.as_mut().expect("just opened"))
    }

    /// Replaces the log with `entries`, oldest first, atomically.
    fn rewrite(&mut self, entries: &HashMap<String, Spent>) -> io::Result<()> {
        let mut sorted: Vec<_> = entries.iter().collect();
        sorted.sort_by_key(|(fp, s)| (s.at, fp.as_str()));
        let text: String = sorted.iter().map(|(fp, s)| line(fp, s)).collect();
        let path = self.dir.join(LEDGER_FILE);
        write_atomically(&self.dir, &path, text.into_bytes(), 0o600)?;
        self.file = Some(open_no_follow(OpenOptions::new().append(true), &path)?);
        self.lines = sorted.len();
        Ok(())
    }
}

fn line(fp: &str, spent: &Spent) -> String {
    let line = Line {
        fp: fp.to_string(),
        account: spent.account.to_string(),
        at: to_unix(spent.at),
        kind: spent.kind,
    };
    let mut text = serde_json::to_string(&line).expect("a ledger line serializes");
    text.push('\n');
    text
}

/// Whether an account holds more than `cap` entries. Compaction brings it down to
/// `PER_ACCOUNT`, so a busy account does not rewrite the log at every append.
fn over_account_cap(entries: &HashMap<String, Spent>, cap: usize) -> bool {
    let mut per: HashMap<&AccountName, usize> = HashMap::new();
    entries.values().any(|s| {
        let n = per.entry(&s.account).or_default();
        *n += 1;
        *n > cap
    })
}

/// Keeps each account's newest `PER_ACCOUNT` entries and the newest `MAX_ENTRIES` in all.
fn bound(entries: &mut HashMap<String, Spent>) {
    let mut sorted: Vec<(String, Spent)> = entries.drain().collect();
    sorted.sort_by(|a, b| (b.1.at, &b.0).cmp(&(a.1.at, &a.0)));
    let mut per: HashMap<AccountName, usize> = HashMap::new();
    for (fp, spent) in sorted {
        let n = per.entry(spent.account.clone()).or_default();
        if *n < PER_ACCOUNT && entries.len() < MAX_ENTRIES {
            *n += 1;
            entries.insert(fp, spent);
        }
    }
}

/// The log's entries (later lines win), its line count, and the length of its whole
/// lines. Lines that do not parse are skipped: a bad line must not make every seed look
/// unspent, and one that is not the last cannot be a torn append.
pub(super) fn read_log(path: &Path) -> io::Result<(HashMap<String, Spent>, usize, u64)> {
    let bytes = match read_no_follow(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((HashMap::new(), 0, 0)),
        Err(e) => return Err(e),
    };
    let good_len = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let mut entries = HashMap::new();
    let mut lines = 0;
    for raw in bytes[..good_len].split(|b| *b == b'\n') {
        let Ok(line) = serde_json::from_slice::<Line>(raw) else {
            continue;
        };
        let Ok(account) = AccountName::parse(&line.account) else {
            continue;
        };
        lines += 1;
        entries.insert(
            line.fp,
            Spent {
                account,
                at: from_unix(line.at),
                kind: line.kind,
            },
        );
    }
    Ok((entries, lines, good_len as u64))
}

/// A spent record of `account` made `at` now.
pub(super) fn record(account: &AccountName, kind: SpentKind) -> Spent {
    Spent {
        account: account.clone(),
        at: SystemTime::now(),
        kind,
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::name;
    use super::*;

    fn entry(account: &str, at: u64) -> Spent {
        Spent {
            account: name(account),
            at: from_unix(at),
            kind: SpentKind::Seed,
        }
    }

    #[test]
    fn entries_survive_a_reopen_and_a_torn_last_line_is_cut_off() {
        let tmp = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(tmp.path()).unwrap();
        let fp = spent_fingerprint(&Secret::new("rt-seed"));
        ledger.append(vec![(fp.clone(), entry("a", 1))]).unwrap();
        drop(ledger);
        // A crash mid-append leaves half a line.
        let path = tmp.path().join(LEDGER_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"fp\":\"0123\",\"acc").unwrap();
        drop(f);

        let ledger = Ledger::open(tmp.path()).unwrap();
        assert_eq!(ledger.get(&fp), Some(entry("a", 1)));
        assert_eq!(ledger.get("0123"), None);
        let fp2 = spent_fingerprint(&Secret::new("rt-other"));
        ledger.append(vec![(fp2.clone(), entry("b", 2))]).unwrap();
        drop(ledger);
        // The next append starts on a line of its own: both entries read back.
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(!text.contains("rt-seed"), "fingerprints only");
        let ledger = Ledger::open(tmp.path()).unwrap();
        assert_eq!(ledger.get(&fp2), Some(entry("b", 2)));
        assert_eq!(ledger.get(&fp), Some(entry("a", 1)));
    }

    #[test]
    fn the_ledger_stays_bounded_per_account_and_in_lines() {
        let tmp = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(tmp.path()).unwrap();
        for i in 0..3 * PER_ACCOUNT as u64 {
            ledger
                .append(vec![(format!("fp-{i}"), entry("busy", i))])
                .unwrap();
        }
        ledger
            .append(vec![("quiet".into(), entry("calm", 0))])
            .unwrap();
        // A rename re-appends the same fingerprints: superseded lines get compacted.
        for _ in 0..40 {
            let moved = ledger.moved(&name("calm"), &name("calm2"));
            ledger.append(moved).unwrap();
            let back = ledger.moved(&name("calm2"), &name("calm"));
            ledger.append(back).unwrap();
        }
        drop(ledger);
        let (entries, lines, _) = read_log(&tmp.path().join(LEDGER_FILE)).unwrap();
        let busy = entries
            .values()
            .filter(|s| s.account == name("busy"))
            .count();
        assert!(busy <= 2 * PER_ACCOUNT, "{busy}");
        assert!(lines <= 2 * entries.len() + SLACK_LINES, "{lines}");
        // The newest of the busy account's entries are the ones kept, and the quiet
        // account's only entry survives the busy one's churn.
        assert!(entries.contains_key(&format!("fp-{}", 3 * PER_ACCOUNT - 1)));
        assert!(!entries.contains_key("fp-0"));
        assert_eq!(entries["quiet"].account, name("calm"));
    }
}
