//! The etcd backend's key layout under `[state] prefix`: one key per record, lease,
//! handoff, demand, spent token, kept-aside copy and live replica, and the schema key.

use crate::config::AccountName;

/// The layout version in the schema key; another value there is refused.
pub(super) const SCHEMA_VERSION: &str = "1";

/// What a key under the prefix is about, for the change feed.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Record,
    Lease,
    Handoff,
    Demand,
}

#[derive(Debug, Clone)]
pub(super) struct Keys {
    prefix: String,
}

impl Keys {
    pub(super) fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    pub(super) fn schema(&self) -> String {
        format!("{}schema", self.prefix)
    }

    pub(super) fn record(&self, account: &AccountName) -> String {
        format!("{}record/{account}", self.prefix)
    }

    pub(super) fn lease(&self, account: &AccountName) -> String {
        format!("{}lease/{account}", self.prefix)
    }

    pub(super) fn leases(&self) -> String {
        format!("{}lease/", self.prefix)
    }

    pub(super) fn handoff(&self, account: &AccountName) -> String {
        format!("{}handoff/{account}", self.prefix)
    }

    pub(super) fn demand(&self, account: &AccountName) -> String {
        format!("{}demand/{account}", self.prefix)
    }

    pub(super) fn spent(&self, fingerprint: &str) -> String {
        format!("{}spent/{fingerprint}", self.prefix)
    }

    pub(super) fn spent_all(&self) -> String {
        format!("{}spent/", self.prefix)
    }

    /// Where `account`'s kept-aside copies live; each is `NAME` below it.
    pub(super) fn aside(&self, account: &AccountName) -> String {
        format!("{}aside/{account}/", self.prefix)
    }

    pub(super) fn node(&self, node_id: &str) -> String {
        format!("{}node/{node_id}", self.prefix)
    }

    pub(super) fn nodes(&self) -> String {
        format!("{}node/", self.prefix)
    }

    /// The account a lease key names (`lease/ACCOUNT`), if it is one.
    pub(super) fn lease_account(&self, key: &[u8]) -> Option<AccountName> {
        match self.parse(key) {
            Some((Kind::Lease, account)) => Some(account),
            _ => None,
        }
    }

    /// What a key of one account (`record/`, `lease/`, `handoff/`, `demand/`) is about;
    /// `None` for every other key.
    pub(super) fn parse(&self, key: &[u8]) -> Option<(Kind, AccountName)> {
        let rest = std::str::from_utf8(key).ok()?.strip_prefix(&self.prefix)?;
        let (kind, account) = rest.split_once('/')?;
        let kind = match kind {
            "record" => Kind::Record,
            "lease" => Kind::Lease,
            "handoff" => Kind::Handoff,
            "demand" => Kind::Demand,
            _ => return None,
        };
        Some((kind, AccountName::parse(account).ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_keys_parse_back_and_other_keys_do_not() {
        let keys = Keys::new("tokend/");
        let a = AccountName::parse("acct-1").unwrap();
        for (key, kind) in [
            (keys.record(&a), Kind::Record),
            (keys.lease(&a), Kind::Lease),
            (keys.handoff(&a), Kind::Handoff),
            (keys.demand(&a), Kind::Demand),
        ] {
            assert_eq!(keys.parse(key.as_bytes()), Some((kind, a.clone())), "{key}");
        }
        assert_eq!(
            keys.lease_account(keys.lease(&a).as_bytes()),
            Some(a.clone())
        );
        for other in [
            keys.schema(),
            keys.spent("ab12"),
            format!("{}x", keys.aside(&a)),
            keys.node("host-a"),
            "other/record/acct-1".to_string(),
            format!("{}record/../x", keys.prefix()),
        ] {
            assert_eq!(keys.parse(other.as_bytes()), None, "{other}");
        }
    }
}
