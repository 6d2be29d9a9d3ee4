//! The operator commands against a shared store (PostgreSQL, etcd): the store opened for
//! one command, and handoffs left there for whichever replica holds the account.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{AccountConfig, Config, StateBackend};
use crate::store::{self, Handoff, Store, StoreError};

/// A shared store opened by a command; [`Opened::close`] stops its background tasks.
pub struct Opened {
    pub store: Arc<dyn Store>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// The shared store `[state]` names; `None` with the file backend.
pub async fn open(config: &Config) -> Result<Option<Opened>, StoreError> {
    if config.state.backend == StateBackend::File {
        return Ok(None);
    }
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let store = store::open(&config.state, &stop, &tasks).await?;
    Ok(Some(Opened { store, stop, tasks }))
}

impl Opened {
    pub async fn close(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// What became of a handoff left in a shared store.
#[derive(Debug)]
pub struct Left {
    /// Where it waits (or waited), for humans.
    pub location: String,
    /// A replica holding the account applied it within the wait.
    pub taken: bool,
}

/// Leaves `handoff` for `account` in the shared store and waits (at most `wait`) until
/// the replica holding the account has applied it. Not taken in time is not an error:
/// it stays in the store, durable, for the next holder (no replica may be running).
pub async fn hand_off(
    store: &dyn Store,
    account: &AccountConfig,
    handoff: &Handoff,
    wait: Duration,
) -> Result<Left, StoreError> {
    let name = &account.name;
    store.put_handoff(name, handoff).await?;
    let location = store.location(name);
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if !store.has_handoff(name).await? {
            return Ok(Left {
                location,
                taken: true,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(Left {
        location,
        taken: false,
    })
}
