//! Who is asking: consumers identified by a bearer key (compared as SHA-256 digests in
//! constant time) or, on a Unix socket, by the peer's uid/gid; and which accounts each
//! may read. With no consumer configured, every local caller that passes the request
//! guards may read every account. Also who may scrape `/metrics` (`server.metrics_key`)
//! and whether its counters may name consumers.

use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{AccountName, ConsumerConfig, ServerConfig};
use crate::listen::Peer;

/// The identified caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No consumers are configured: access is open to local callers.
    Anyone,
    Consumer {
        name: String,
        accounts: Option<Vec<AccountName>>,
    },
}

impl Caller {
    pub fn may_read(&self, account: &AccountName) -> bool {
        match self {
            Caller::Anyone => true,
            Caller::Consumer { accounts, .. } => {
                accounts.as_ref().is_none_or(|a| a.contains(account))
            }
        }
    }

    /// The consumer's name for logs and metrics (`-` when access is open).
    pub fn label(&self) -> &str {
        match self {
            Caller::Anyone => "-",
            Caller::Consumer { name, .. } => name,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error("this daemon requires a consumer key: send Authorization: Bearer <key>")]
    NoCredentials,
    #[error("the consumer key is not valid")]
    WrongKey,
    #[error("/metrics requires the metrics key: send Authorization: Bearer <server.metrics_key>")]
    NoMetricsKey,
    #[error("the metrics key is not valid")]
    WrongMetricsKey,
}

/// The configured consumers, and the key of `/metrics`.
#[derive(Debug, Default, Clone)]
pub struct Access {
    consumers: Vec<ConsumerConfig>,
    metrics_key_sha256: Option<[u8; 32]>,
    metrics_consumer_labels: bool,
}

impl Access {
    pub fn new(consumers: Vec<ConsumerConfig>) -> Access {
        Access {
            consumers,
            ..Access::default()
        }
    }

    /// With `/metrics` behind `server.metrics_key`, and consumers named in its counters
    /// only if `server.metrics_consumer_labels`.
    pub fn with_metrics(mut self, server: &ServerConfig) -> Access {
        self.metrics_key_sha256 = server.metrics_key_sha256;
        self.metrics_consumer_labels = server.metrics_consumer_labels;
        self
    }

    /// Whether consumers are configured: then details about accounts need a key.
    pub fn has_consumers(&self) -> bool {
        !self.consumers.is_empty()
    }

    /// The `consumer` label of a token read by `caller`: `-` unless the operator asked
    /// for names (a scrape would otherwise list every consumer).
    pub fn metrics_label<'a>(&self, caller: &'a Caller) -> Option<&'a str> {
        match caller {
            Caller::Consumer { name, .. } if self.metrics_consumer_labels => Some(name),
            _ => None,
        }
    }

    /// Whether a request may read `/metrics`: always when no key is configured, else only
    /// with `Authorization: Bearer <metrics_key>`, compared as a digest in constant time.
    pub fn may_scrape(&self, headers: &HeaderMap) -> Result<(), AccessError> {
        let Some(expected) = &self.metrics_key_sha256 else {
            return Ok(());
        };
        let key = bearer(headers).ok_or(AccessError::NoMetricsKey)?;
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        if bool::from(expected.ct_eq(&digest)) {
            Ok(())
        } else {
            Err(AccessError::WrongMetricsKey)
        }
    }

    /// Identifies the caller from its `Authorization` header or its socket credentials.
    pub fn identify(
        &self,
        headers: &HeaderMap,
        peer: Option<&Peer>,
    ) -> Result<Caller, AccessError> {
        if self.consumers.is_empty() {
            return Ok(Caller::Anyone);
        }
        if let Some(key) = bearer(headers) {
            let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
            // Every configured key is compared, matching or not, so timing tells nothing.
            let mut found = None;
            for consumer in &self.consumers {
                if let Some(expected) = &consumer.key_sha256
                    && bool::from(expected.ct_eq(&digest))
                {
                    found = Some(consumer);
                }
            }
            return found.map(caller).ok_or(AccessError::WrongKey);
        }
        if let Some(Peer::Unix { uid, gid }) = peer {
            let matched = self.consumers.iter().find(|c| {
                (c.uid.is_some() || c.gid.is_some())
                    && c.uid.is_none_or(|u| u == *uid)
                    && c.gid.is_none_or(|g| g == *gid)
            });
            if let Some(c) = matched {
                return Ok(caller(c));
            }
        }
        Err(AccessError::NoCredentials)
    }
}

/// The key of an `Authorization: Bearer <key>` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

fn caller(c: &ConsumerConfig) -> Caller {
    Caller::Consumer {
        name: c.name.clone(),
        accounts: c.accounts.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consumer(
        name: &str,
        key: Option<&str>,
        uid: Option<u32>,
        accounts: Option<&[&str]>,
    ) -> ConsumerConfig {
        ConsumerConfig {
            name: name.into(),
            key_sha256: key.map(|k| Sha256::digest(k.as_bytes()).into()),
            uid,
            gid: None,
            accounts: accounts.map(|a| a.iter().map(|n| AccountName::parse(n).unwrap()).collect()),
        }
    }

    fn bearer(key: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {key}").parse().unwrap(),
        );
        h
    }

    #[test]
    fn no_consumers_means_open_access() {
        assert_eq!(
            Access::default().identify(&HeaderMap::new(), None),
            Ok(Caller::Anyone)
        );
    }

    #[test]
    fn keys_identify_consumers_and_scope_their_accounts() {
        let access = Access::new(vec![
            consumer("billing", Some("k-billing"), None, Some(&["zywave"])),
            consumer("ops", Some("k-ops"), None, None),
        ]);
        let billing = access.identify(&bearer("k-billing"), None).unwrap();
        assert_eq!(billing.label(), "billing");
        assert!(billing.may_read(&AccountName::parse("zywave").unwrap()));
        assert!(!billing.may_read(&AccountName::parse("zephr").unwrap()));
        assert!(
            access
                .identify(&bearer("k-ops"), None)
                .unwrap()
                .may_read(&AccountName::parse("zephr").unwrap())
        );
        assert_eq!(
            access.identify(&bearer("k-wrong"), None),
            Err(AccessError::WrongKey)
        );
        assert_eq!(
            access.identify(&HeaderMap::new(), None),
            Err(AccessError::NoCredentials)
        );
    }

    #[test]
    fn unix_peers_are_matched_by_uid_but_tcp_peers_are_not() {
        let access = Access::new(vec![consumer("app", None, Some(1001), None)]);
        let unix = Peer::Unix { uid: 1001, gid: 5 };
        assert_eq!(
            access
                .identify(&HeaderMap::new(), Some(&unix))
                .unwrap()
                .label(),
            "app"
        );
        let other = Peer::Unix { uid: 1002, gid: 5 };
        assert_eq!(
            access.identify(&HeaderMap::new(), Some(&other)),
            Err(AccessError::NoCredentials)
        );
        let tcp = Peer::Tcp("127.0.0.1:5000".parse().unwrap());
        assert_eq!(
            access.identify(&HeaderMap::new(), Some(&tcp)),
            Err(AccessError::NoCredentials)
        );
    }
}
