//! Per-host admission: how many requests may be in flight to one provider host at once,
//! and how evenly their starts are spaced ([`HostLimits`]). It sends nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Url;

use crate::config::HostLimits;

/// One gate per provider host (scheme and authority), made on first use.
pub(super) struct HostGates {
    limits: HostLimits,
    hosts: Mutex<HashMap<String, Arc<HostGate>>>,
}

/// Admission to one provider host: a slot among its concurrent requests, then, when the
/// host is paced, the next free start time.
struct HostGate {
    slots: Arc<tokio::sync::Semaphore>,
    pace: Option<Pace>,
}

/// Evenly spaced request starts. No credit builds up while the host is idle, so no
/// second ever sees more than the configured rate (plus one).
struct Pace {
    interval: Duration,
    next: Mutex<tokio::time::Instant>,
}

impl Pace {
    /// Books the next start time at or after `now`.
    fn book(&self, now: tokio::time::Instant) -> tokio::time::Instant {
        let mut next = self.next.lock().expect("pace lock");
        let at = (*next).max(now);
        *next = at + self.interval;
        at
    }
}

/// A turn at calling one provider host: its slot is held until the exchange ends.
pub struct Turn {
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl HostGates {
    pub(super) fn new(limits: HostLimits) -> HostGates {
        HostGates {
            limits,
            hosts: Mutex::new(HashMap::new()),
        }
    }

    fn gate(&self, url: &Url) -> Arc<HostGate> {
        let host = format!("{}://{}", url.scheme(), url.authority());
        let mut map = self.hosts.lock().expect("host gate lock");
        map.entry(host)
            .or_insert_with(|| {
                Arc::new(HostGate {
                    slots: Arc::new(tokio::sync::Semaphore::new(self.limits.max_concurrent)),
                    pace: self.limits.max_per_second.map(|rate| Pace {
                        interval: Duration::from_secs_f64(1.0 / rate),
                        next: Mutex::new(tokio::time::Instant::now()),
                    }),
                })
            })
            .clone()
    }

    /// Waits for a free slot at `url`'s host, then its paced start time (see
    /// [`Provider::turn`](super::Provider::turn)).
    pub(super) async fn turn(&self, url: &Url) -> Turn {
        let gate = self.gate(url);
        let slot = gate
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        if let Some(pace) = &gate.pace {
            tokio::time::sleep_until(pace.book(tokio::time::Instant::now())).await;
        }
        Turn { _slot: slot }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pace_spaces_starts_and_banks_no_credit_while_idle() {
        let ms = Duration::from_millis;
        let start = tokio::time::Instant::now();
        let pace = Pace {
            interval: ms(100),
            next: Mutex::new(start),
        };
        assert_eq!(pace.book(start), start);
        assert_eq!(pace.book(start), start + ms(100));
        assert_eq!(pace.book(start + ms(10)), start + ms(200));
        // After a quiet spell the next start is now, not a burst of missed ones.
        let later = start + Duration::from_secs(10);
        assert_eq!(pace.book(later), later);
        assert_eq!(pace.book(later), later + ms(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_host_admits_its_limit_and_hosts_do_not_share_slots() {
        let gates = HostGates::new(HostLimits {
            max_concurrent: 1,
            max_per_second: None,
        });
        let token = Url::parse("https://a.example/token").unwrap();
        let revoke = Url::parse("https://a.example/revoke").unwrap();
        let elsewhere = Url::parse("https://b.example/token").unwrap();
        let first = gates.turn(&token).await;
        let same_host = tokio::time::timeout(Duration::from_secs(60), gates.turn(&revoke));
        assert!(
            same_host.await.is_err(),
            "a second turn at a full host waits"
        );
        let _other_host = gates.turn(&elsewhere).await;
        drop(first);
        let _second = gates.turn(&revoke).await;
    }
}
