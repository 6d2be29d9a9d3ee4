//! Account records, handoffs, kept-aside copies and the ledger of spent refresh tokens as
//! etcd keys. Values are exactly the file store's bytes ([`super::super::wire`]), sealed
//! when a keyring is set; an undecodable value is reported and left where it is, since in
//! a shared store it may be a replica with the wrong key that cannot read it.

use std::io;
use std::path::PathBuf;
use std::time::SystemTime;

use etcd_client::{Compare, CompareOp, GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use super::EtcdStore;
use super::lease::revision;
use crate::config::AccountName;
use crate::store::wire::{decode, decode_handoff, encode, encode_handoff, from_unix, to_unix};
use crate::store::{Handoff, Lease, Spent, SpentKind, State, StoreError};

/// Ledger entries kept per account, newest first (the contract asks for at least 64).
const SPENT_PER_ACCOUNT: usize = 64;
/// How often a rename is tried again when a record changes under it.
const RENAME_ATTEMPTS: usize = 3;

/// The value of `spent/FINGERPRINT`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpentValue {
    account: String,
    at: u64,
    kind: SpentKind,
}

impl SpentValue {
    fn parse(bytes: &[u8]) -> Option<Spent> {
        let v: SpentValue = serde_json::from_slice(bytes).ok()?;
        Some(Spent {
            account: AccountName::parse(&v.account).ok()?,
            at: from_unix(v.at),
            kind: v.kind,
        })
    }

    fn bytes(spent: &Spent) -> Vec<u8> {
        let v = SpentValue {
            account: spent.account.to_string(),
            at: to_unix(spent.at),
            kind: spent.kind,
        };
        serde_json::to_vec(&v).expect("a ledger entry serializes")
    }
}

/// Decodes a value and wipes the bytes it was read from.
fn decoded<T>(kv: KeyValue, decode: impl FnOnce(&[u8]) -> Result<T, String>) -> Result<T, String> {
    let (_, mut value) = kv.into_key_value();
    let out = decode(&value);
    value.zeroize();
    out
}

impl EtcdStore {
    fn unreadable(&self, account: &AccountName, key: String, reason: String) -> StoreError {
        StoreError::Read {
            account: account.clone(),
            path: PathBuf::from(key),
            source: io::Error::new(io::ErrorKind::InvalidData, reason),
        }
    }

    pub(super) async fn load_record(
        &self,
        account: &AccountName,
    ) -> Result<Option<State>, StoreError> {
        let key = self.keys.record(account);
        let mut answer = self.get("load", &key, None).await?;
        let at = answer.header().map_or(0, |h| h.revision());
        let Some(kv) = answer.take_kvs().pop() else {
            self.saw(account, at, 0);
            return Ok(None);
        };
        let mod_revision = kv.mod_revision();
        let state = decoded(kv, |b| decode(b, account, self.keyring.as_ref()))
            .map_err(|reason| self.unreadable(account, key, reason))?;
        self.saw(account, at, mod_revision);
        Ok(Some(state))
    }

    pub(super) async fn save_record(
        &self,
        account: &AccountName,
        state: &State,
    ) -> Result<(), StoreError> {
        let bytes = encode(account, state, self.keyring.as_ref());
        let answer = self
            .put("save", self.keys.record(account), bytes, None)
            .await?;
        let at = answer.header().map_or(0, |h| h.revision());
        self.saw(account, at, at);
        Ok(())
    }

    pub(super) async fn remove_record(&self, account: &AccountName) -> Result<(), StoreError> {
        let answer = self.delete("remove", self.keys.record(account)).await?;
        self.saw(account, answer.header().map_or(0, |h| h.revision()), 0);
        Ok(())
    }

    /// One txn: the lease key is still the one created at `lease.epoch` (it goes when the
    /// holder's etcd lease expires), and the record is still the one this instance last
    /// saw; only then the put.
    pub(super) async fn save_record_fenced(
        &self,
        account: &AccountName,
        state: &State,
        lease: Lease,
    ) -> Result<(), StoreError> {
        let record = self.keys.record(account);
        let seen = self.last_seen(account);
        let bytes = encode(account, state, self.keyring.as_ref());
        let fenced = Txn::new()
            .when([
                Compare::create_revision(
                    self.keys.lease(account),
                    CompareOp::Equal,
                    revision(lease.epoch),
                ),
                Compare::mod_revision(record.as_str(), CompareOp::Equal, seen),
            ])
            .and_then([TxnOp::put(record.as_str(), bytes, None)]);
        let answer = self.txn("fenced save", fenced).await?;
        if !answer.succeeded() {
            return Err(StoreError::Fenced {
                account: account.clone(),
                epoch: lease.epoch,
            });
        }
        let at = answer.header().map_or(0, |h| h.revision());
        self.saw(account, at, at);
        Ok(())
    }

    pub(super) async fn load_handoff_record(
        &self,
        account: &AccountName,
    ) -> Result<Option<Handoff>, StoreError> {
        let key = self.keys.handoff(account);
        let mut answer = self.get("load handoff", &key, None).await?;
        let Some(kv) = answer.take_kvs().pop() else {
            return Ok(None);
        };
        decoded(kv, |b| decode_handoff(b, account, self.keyring.as_ref()))
            .map(Some)
            .map_err(|reason| self.unreadable(account, key, reason))
    }

    pub(super) async fn put_handoff_record(
        &self,
        account: &AccountName,
        handoff: &Handoff,
    ) -> Result<(), StoreError> {
        let bytes = encode_handoff(account, handoff, self.keyring.as_ref());
        let key = self.keys.handoff(account);
        self.put("put handoff", key, bytes, None).await.map(drop)
    }

    pub(super) async fn record_spent_entry(
        &self,
        account: &AccountName,
        fingerprint: &str,
        kind: SpentKind,
    ) -> Result<(), StoreError> {
        let entry = Spent {
            account: account.clone(),
            at: SystemTime::now(),
            kind,
        };
        let key = self.keys.spent(fingerprint);
        self.put("record spent token", key, SpentValue::bytes(&entry), None)
            .await?;
        self.prune_spent(account).await
    }

    /// Drops `account`'s oldest ledger entries beyond [`SPENT_PER_ACCOUNT`]. Rare: only
    /// seeds and handed-over tokens are recorded, so reading the whole ledger is cheap.
    async fn prune_spent(&self, account: &AccountName) -> Result<(), StoreError> {
        let mut mine: Vec<(SystemTime, i64, Vec<u8>)> = self
            .ledger()
            .await?
            .into_iter()
            .filter(|(_, spent, _)| &spent.account == account)
            .map(|(key, spent, rev)| (spent.at, rev, key))
            .collect();
        if mine.len() <= SPENT_PER_ACCOUNT {
            return Ok(());
        }
        mine.sort();
        let over = mine.len() - SPENT_PER_ACCOUNT;
        let oldest: Vec<TxnOp> = mine
            .into_iter()
            .take(over)
            .map(|(_, _, key)| TxnOp::delete(key, None))
            .collect();
        self.txn("prune spent tokens", Txn::new().and_then(oldest))
            .await
            .map(drop)
    }

    /// Every ledger entry: its key, what it says, its mod revision.
    async fn ledger(&self) -> Result<Vec<(Vec<u8>, Spent, i64)>, StoreError> {
        let options = GetOptions::new().with_prefix();
        let mut answer = self
            .get("read spent tokens", &self.keys.spent_all(), Some(options))
            .await?;
        Ok(answer
            .take_kvs()
            .into_iter()
            .filter_map(|kv| {
                let rev = kv.mod_revision();
                let spent = SpentValue::parse(kv.value())?;
                Some((kv.into_key_value().0, spent, rev))
            })
            .collect())
    }

    pub(super) async fn spent_entry(&self, fingerprint: &str) -> Result<Option<Spent>, StoreError> {
        let answer = self
            .get("spent token", &self.keys.spent(fingerprint), None)
            .await?;
        Ok(answer
            .kvs()
            .first()
            .and_then(|kv| SpentValue::parse(kv.value())))
    }

    /// Moves the record and the ledger entries in one txn, conditional on both records
    /// being as read: the record is under `from` or under `to`, never neither.
    pub(super) async fn rename_record(
        &self,
        from: &AccountName,
        to: &AccountName,
    ) -> Result<(), StoreError> {
        for _ in 0..RENAME_ATTEMPTS {
            let (from_key, to_key) = (self.keys.record(from), self.keys.record(to));
            let read = Txn::new().and_then([
                TxnOp::get(from_key.as_str(), None),
                TxnOp::get(to_key.as_str(), None),
            ]);
            let answer = self.txn("rename: read", read).await?;
            let mut found = answer.op_responses().into_iter().map(|r| match r {
                TxnOpResponse::Get(mut get) => get.take_kvs().pop(),
                _ => None,
            });
            let (from_kv, to_kv) = (found.next().flatten(), found.next().flatten());
            let Some(from_kv) = from_kv else {
                return Err(StoreError::NothingToMove {
                    account: from.clone(),
                    path: PathBuf::from(from_key),
                });
            };
            let from_rev = from_kv.mod_revision();
            let to_rev = to_kv.as_ref().map_or(0, KeyValue::mod_revision);
            let mut state = decoded(from_kv, |b| decode(b, from, self.keyring.as_ref()))
                .map_err(|reason| self.unreadable(from, from_key.clone(), reason))?;
            if let Some(kv) = to_kv {
                let target = decoded(kv, |b| decode(b, to, self.keyring.as_ref()))
                    .map_err(|reason| self.unreadable(to, to_key.clone(), reason))?;
                if let Some(rt) = target.refresh_token
                    && Some(&rt) != state.refresh_token.as_ref()
                {
                    return Err(StoreError::Occupied {
                        account: to.clone(),
                        path: PathBuf::from(to_key),
                    });
                }
            }
            // A copy kept aside under the old name stays for a human.
            state.replaced = None;
            let mut ops = vec![
                TxnOp::put(
                    to_key.as_str(),
                    encode(to, &state, self.keyring.as_ref()),
                    None,
                ),
                TxnOp::delete(from_key.as_str(), None),
            ];
            for (key, mut spent, _) in self.ledger().await? {
                if &spent.account == from {
                    spent.account = to.clone();
                    ops.push(TxnOp::put(key, SpentValue::bytes(&spent), None));
                }
            }
            let commit = Txn::new()
                .when([
                    Compare::mod_revision(from_key.as_str(), CompareOp::Equal, from_rev),
                    Compare::mod_revision(to_key.as_str(), CompareOp::Equal, to_rev),
                ])
                .and_then(ops);
            let answer = self.txn("rename", commit).await?;
            if answer.succeeded() {
                let at = answer.header().map_or(0, |h| h.revision());
                self.saw(from, at, 0);
                self.saw(to, at, at);
                return Ok(());
            }
        }
        Err(self.unavailable(format!(
            "rename {from} to {to}: the records kept changing during the move; try again"
        )))
    }

    /// Copies the record's bytes, as they are, to `aside/ACCOUNT/replaced-UNIXTIME`.
    pub(super) async fn set_record_aside(
        &self,
        account: &AccountName,
    ) -> Result<Option<String>, StoreError> {
        let mut answer = self
            .get("set aside", &self.keys.record(account), None)
            .await?;
        let Some(kv) = answer.take_kvs().pop() else {
            return Ok(None);
        };
        let kept = format!(
            "{}replaced-{}",
            self.keys.aside(account),
            to_unix(SystemTime::now())
        );
        let (_, bytes) = kv.into_key_value();
        self.put("set aside", kept.as_str(), bytes, None).await?;
        Ok(Some(kept))
    }
}
