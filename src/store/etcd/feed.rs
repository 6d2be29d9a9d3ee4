//! The change feed: one watch on the whole prefix, from the revision after connect's
//! read, mapped to [`Change`]s. A watch that ends (an error, the stream's end, no leader,
//! or a compaction that erased revisions it had yet to send) is opened again from the
//! current revision after a bounded backoff, and announced with [`Change::Resync`]:
//! subscribers read again what they serve, so nothing missed in between is lost.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions, WatchResponse, WatchStream};
use tokio_util::sync::CancellationToken;

use super::EtcdStore;
use super::keys::Kind;
use crate::store::Change;

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How a watch ended.
enum Ended {
    Cancelled,
    /// Its start revision was compacted away: events were lost.
    Compacted,
    /// An error, the stream's end, or a cancellation by the server (no leader).
    Broken(String),
}

/// Runs the feed until `cancel`, starting at revision `first`.
pub(super) async fn run(store: Arc<EtcdStore>, first: i64, cancel: CancellationToken) {
    let mut backoff = FIRST_BACKOFF;
    let mut start = first;
    // Set once a watch was interrupted: the next one to open announces it.
    let mut resync = false;
    loop {
        let options = WatchOptions::new().with_prefix().with_start_revision(start);
        let prefix = store.keys.prefix().to_string();
        let mut watch_client = store.client.watch_client();
        let opened = tokio::select! {
            () = cancel.cancelled() => return,
            opened = tokio::time::timeout(store.timeout, watch_client.watch(prefix, Some(options))) => opened,
        };
        let ended = match opened {
            Ok(Ok(mut stream)) => {
                pump(&store, &mut stream, &mut resync, &mut backoff, &cancel).await
            }
            Ok(Err(e)) => Ended::Broken(e.to_string()),
            Err(_) => Ended::Broken(format!("no answer within {:?}", store.timeout)),
        };
        // From the current revision (0): what happened before, subscribers read after
        // the Resync. Resuming from the last revision seen instead could meet a
        // compaction only after announcing the watch, and lose the events in between.
        resync = true;
        start = 0;
        match ended {
            Ended::Cancelled => return,
            Ended::Compacted => {
                tracing::warn!(location = %store.location, "the etcd watch fell behind a compaction: reading everything again");
            }
            Ended::Broken(why) => {
                tracing::warn!(location = %store.location, "the etcd watch was interrupted ({why}); opening it again");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Delivers one watch's events until it ends.
async fn pump(
    store: &EtcdStore,
    stream: &mut WatchStream,
    resync: &mut bool,
    backoff: &mut Duration,
    cancel: &CancellationToken,
) -> Ended {
    loop {
        let message = tokio::select! {
            () = cancel.cancelled() => return Ended::Cancelled,
            message = stream.message() => message,
        };
        let answer = match message {
            Ok(Some(answer)) => answer,
            Ok(None) => return Ended::Broken("the stream ended".into()),
            Err(e) => return Ended::Broken(e.to_string()),
        };
        if answer.compact_revision() > 0 {
            return Ended::Compacted;
        }
        if answer.canceled() {
            return Ended::Broken(format!("cancelled by etcd: {}", answer.cancel_reason()));
        }
        if answer.created() {
            *backoff = FIRST_BACKOFF;
            // Sent once the new watch is in place: whatever subscribers read after it is
            // at least as new as what the watch missed.
            if std::mem::take(resync) {
                let _ = store.feed.send(Change::Resync);
            }
        }
        deliver(store, &answer);
    }
}

fn deliver(store: &EtcdStore, answer: &WatchResponse) {
    for event in answer.events() {
        let Some(kv) = event.kv() else { continue };
        let Some((kind, account)) = store.keys.parse(kv.key()) else {
            continue;
        };
        let change = match (kind, event.event_type()) {
            (Kind::Record, _) => Change::Record(account),
            (Kind::Handoff, EventType::Put) => Change::Handoff(account),
            (Kind::Demand, EventType::Put) => Change::Demand(account),
            (Kind::Lease, EventType::Delete) => Change::LeaseFreed(account),
            _ => continue,
        };
        // No subscriber is not an error: the feed runs for whoever subscribes later.
        let _ = store.feed.send(change);
    }
}
