//! The PostgreSQL store's change feed: a connection of its own that LISTENs on the
//! store's channel, turns each notification into a [`Change`], and after losing the
//! server reconnects (backing off, until shutdown) and says [`Change::Resync`].

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::Sender;
use tokio_postgres::{AsyncMessage, Client};
use tokio_util::sync::CancellationToken;

use super::link::{Connection, Link, describe};
use crate::config::AccountName;
use crate::store::{Change, StoreError};

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A connection that is listening, with its client (dropping that would close it).
pub(super) struct Listening {
    _client: Client,
    connection: Connection,
}

/// Opens a connection and LISTENs on `channel`; what arrives meanwhile is passed on.
pub(super) async fn listen(
    link: &Link,
    channel: &str,
    feed: &Sender<Change>,
) -> Result<Listening, StoreError> {
    let (client, mut connection) = link.open().await?;
    let statement = format!("LISTEN \"{channel}\"");
    let setup = async {
        let mut listen = std::pin::pin!(client.batch_execute(&statement));
        loop {
            tokio::select! {
                done = &mut listen => return done.map_err(|e| link.failed(&e)),
                message = next(&mut connection) => forward(message, feed).map_err(|e| link.unavailable(e))?,
            }
        }
    };
    match tokio::time::timeout(link.timeout, setup).await {
        Ok(Ok(())) => Ok(Listening {
            _client: client,
            connection,
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(link.unavailable(format!("LISTEN had no answer within {:?}", link.timeout))),
    }
}

/// Serves the feed from `first` on; whenever the connection is lost, listens again
/// (backing off) and sends [`Change::Resync`]. Ends when `stop` is cancelled.
pub(super) async fn run(
    link: Arc<Link>,
    channel: String,
    feed: Sender<Change>,
    stop: CancellationToken,
    first: Listening,
) {
    let mut current = Some(first);
    let mut backoff = FIRST_BACKOFF;
    loop {
        let mut listening = match current.take() {
            Some(l) => l,
            None => {
                let attempt = tokio::select! {
                    () = stop.cancelled() => return,
                    attempt = listen(&link, &channel, &feed) => attempt,
                };
                match attempt {
                    Ok(l) => {
                        tracing::info!(store = %link.target.location, "the change feed is back");
                        backoff = FIRST_BACKOFF;
                        let _ = feed.send(Change::Resync);
                        l
                    }
                    Err(e) => {
                        tracing::debug!("{e}; retrying in {backoff:?}");
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                }
            }
        };
        let lost = loop {
            let message = tokio::select! {
                () = stop.cancelled() => return,
                message = next(&mut listening.connection) => message,
            };
            if let Err(reason) = forward(message, &feed) {
                break reason;
            }
        };
        tracing::warn!(
            store = %link.target.location,
            "lost the change feed connection ({}); reconnecting",
            link.target.scrub(lost)
        );
    }
}

async fn next(connection: &mut Connection) -> Option<Result<AsyncMessage, tokio_postgres::Error>> {
    std::future::poll_fn(|cx| connection.poll_message(cx)).await
}

/// Passes a notification on; `Err` when the connection has ended.
fn forward(
    message: Option<Result<AsyncMessage, tokio_postgres::Error>>,
    feed: &Sender<Change>,
) -> Result<(), String> {
    match message {
        Some(Ok(AsyncMessage::Notification(n))) => {
            if let Some(change) = change_of(n.payload()) {
                let _ = feed.send(change);
            }
            Ok(())
        }
        Some(Ok(_)) => Ok(()),
        Some(Err(e)) => Err(describe(&e)),
        None => Err("the server closed it".into()),
    }
}

/// `record:ACCOUNT`, `handoff:ACCOUNT`, `demand:ACCOUNT`, `freed:ACCOUNT`; anything else
/// (a newer tokend's kinds) is passed over.
pub(super) fn change_of(payload: &str) -> Option<Change> {
    let (kind, account) = payload.split_once(':')?;
    let account = AccountName::parse(account).ok()?;
    Some(match kind {
        "record" => Change::Record(account),
        "handoff" => Change::Handoff(account),
        "demand" => Change::Demand(account),
        "freed" => Change::LeaseFreed(account),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_become_changes_and_unknown_ones_are_passed_over() {
        let a = AccountName::parse("acct").unwrap();
        assert_eq!(change_of("record:acct"), Some(Change::Record(a.clone())));
        assert_eq!(change_of("freed:acct"), Some(Change::LeaseFreed(a.clone())));
        assert_eq!(change_of("demand:acct"), Some(Change::Demand(a)));
        assert_eq!(change_of("later:acct"), None);
        assert_eq!(change_of("record:../x"), None);
    }
}
