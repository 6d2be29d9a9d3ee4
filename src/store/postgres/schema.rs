//! The PostgreSQL store's tables (named with the configured prefix), their creation
//! under an advisory lock so that replicas starting together do not race, and every
//! statement the store runs, each one a transaction of its own.

use std::time::Duration;

use tokio_postgres::Client;

/// The schema this build creates and the only one it uses.
pub(super) const SCHEMA_VERSION: i32 = 1;

/// The statements, with the table names, the notification channel and the lease
/// lifetime written in (all from validated config: the prefix holds no quote).
pub(super) struct Sql {
    pub(super) accounts: String,
    pub(super) handoffs: String,
    pub(super) channel: String,
    prefix: String,
    pub(super) load: String,
    pub(super) save: String,
    pub(super) remove: String,
    pub(super) save_fenced: String,
    pub(super) acquire: String,
    pub(super) holder_now: String,
    pub(super) renew: String,
    pub(super) release: String,
    pub(super) holder: String,
    pub(super) replicas: String,
    pub(super) has_handoff: String,
    pub(super) load_handoff: String,
    pub(super) put_handoff: String,
    pub(super) clear_handoff: String,
    pub(super) record_spent: String,
    pub(super) spent: String,
    pub(super) set_aside: String,
    pub(super) drop_aside: String,
    pub(super) notify: String,
    pub(super) check: String,
    pub(super) heartbeat: String,
    pub(super) lock_rows: String,
    pub(super) move_spent: String,
}

impl Sql {
    pub(super) fn new(prefix: &str, lease_ttl: Duration) -> Sql {
        let t = |name: &str| format!("\"{prefix}{name}\"");
        let (a, h, s, x, n) = (
            t("accounts"),
            t("handoffs"),
            t("spent"),
            t("aside"),
            t("nodes"),
        );
        let channel = format!("{prefix}changes");
        let notify =
            |kind: &str, account: &str| format!("pg_notify('{channel}', '{kind}:' || {account})");
        let ttl = format!("interval '{} milliseconds'", lease_ttl.as_millis());
        Sql {
            load: format!("SELECT record, version FROM {a} WHERE account = $1"),
            save: format!(
                "INSERT INTO {a} AS a (account, record, version) VALUES ($1, $2, 1) \
                 ON CONFLICT (account) DO UPDATE SET record = EXCLUDED.record, version = a.version + 1 \
                 RETURNING a.version, {}",
                notify("record", "a.account")
            ),
            remove: format!(
                "UPDATE {a} SET record = NULL, version = version + 1 \
                 WHERE account = $1 AND record IS NOT NULL RETURNING version, {}",
                notify("record", "account")
            ),
            save_fenced: format!(
                "UPDATE {a} SET record = $2, version = version + 1 \
                 WHERE account = $1 AND holder = $3 AND epoch = $4 AND version = $5 \
                 AND lease_expires > now() RETURNING version, {}",
                notify("record", "account")
            ),
            // One statement: a free or expired lease is taken with a new epoch, this
            // replica's current one renewed with the same; `prior` (the row as it was
            // when the statement began) names the holder otherwise.
            acquire: format!(
                "WITH prior AS (SELECT holder FROM {a} WHERE account = $1), \
                 taken AS (INSERT INTO {a} AS a (account, version, holder, epoch, lease_expires) \
                   VALUES ($1, 0, $2, 1, now() + {ttl}) \
                   ON CONFLICT (account) DO UPDATE SET holder = $2, lease_expires = now() + {ttl}, \
                     epoch = CASE WHEN a.holder = $2 AND a.epoch = $3 AND a.lease_expires > now() \
                                  THEN a.epoch ELSE a.epoch + 1 END \
                   WHERE a.holder IS NULL OR a.lease_expires <= now() \
                      OR (a.holder = $2 AND a.epoch = $3) \
                   RETURNING a.epoch) \
                 SELECT (SELECT epoch FROM taken), (SELECT holder FROM prior)"
            ),
            holder_now: format!("SELECT holder FROM {a} WHERE account = $1"),
            renew: format!(
                "WITH beat AS (INSERT INTO {n} (node_id, seen) VALUES ($1, now()) \
                   ON CONFLICT (node_id) DO UPDATE SET seen = now()) \
                 UPDATE {a} AS a SET lease_expires = now() + {ttl} \
                 FROM unnest($2::text[], $3::int8[]) AS h(account, epoch) \
                 WHERE a.account = h.account AND a.epoch = h.epoch AND a.holder = $1 \
                   AND a.lease_expires > now() \
                 RETURNING a.account, a.epoch"
            ),
            release: format!(
                "UPDATE {a} SET holder = NULL, lease_expires = NULL \
                 WHERE account = $1 AND holder = $2 AND epoch = $3 RETURNING {}",
                notify("freed", "account")
            ),
            holder: format!(
                "SELECT holder FROM {a} WHERE account = $1 AND holder IS NOT NULL \
                 AND lease_expires > now()"
            ),
            replicas: format!(
                "SELECT node_id FROM {n} WHERE seen > now() - {ttl} \
                 UNION SELECT holder FROM {a} WHERE holder IS NOT NULL AND lease_expires > now() \
                 ORDER BY 1"
            ),
            heartbeat: format!(
                "WITH gone AS (DELETE FROM {n} WHERE seen < now() - interval '1 day') \
                 INSERT INTO {n} (node_id, seen) VALUES ($1, now()) \
                 ON CONFLICT (node_id) DO UPDATE SET seen = now()"
            ),
            has_handoff: format!("SELECT 1 FROM {h} WHERE account = $1"),
            load_handoff: format!("SELECT handoff FROM {h} WHERE account = $1"),
            put_handoff: format!(
                "INSERT INTO {h} AS h (account, handoff, at) VALUES ($1, $2, now()) \
                 ON CONFLICT (account) DO UPDATE SET handoff = EXCLUDED.handoff, at = now() \
                 RETURNING {}",
                notify("handoff", "h.account")
            ),
            clear_handoff: format!("DELETE FROM {h} WHERE account = $1"),
            // The new entry is not visible to the DELETE (same snapshot): 64 older stay.
            record_spent: format!(
                "WITH put AS (INSERT INTO {s} (fingerprint, account, at, kind) VALUES ($1, $2, $3, $4) \
                   ON CONFLICT (fingerprint) DO UPDATE SET account = EXCLUDED.account, \
                     at = EXCLUDED.at, kind = EXCLUDED.kind) \
                 DELETE FROM {s} WHERE account = $2 AND fingerprint <> $1 AND fingerprint NOT IN \
                   (SELECT fingerprint FROM {s} WHERE account = $2 ORDER BY at DESC LIMIT 64)"
            ),
            spent: format!("SELECT account, at, kind FROM {s} WHERE fingerprint = $1"),
            set_aside: format!(
                "INSERT INTO {x} AS x (account, name, record, at) \
                 SELECT account, account || '.replaced-' || floor(extract(epoch FROM now()))::bigint, \
                   record, now() FROM {a} WHERE account = $1 AND record IS NOT NULL \
                 ON CONFLICT (account, name) DO UPDATE SET at = x.at RETURNING x.name"
            ),
            drop_aside: format!("DELETE FROM {x} WHERE account = $1 AND name = $2"),
            notify: format!("SELECT pg_notify('{channel}', $1)"),
            check: format!(
                "SELECT (SELECT version FROM {}), current_setting('server_version'), \
                 (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())",
                t("schema")
            ),
            lock_rows: format!(
                "SELECT account, record FROM {a} WHERE account = ANY($1) FOR UPDATE"
            ),
            move_spent: format!("UPDATE {s} SET account = $2 WHERE account = $1"),
            accounts: format!("{prefix}accounts"),
            handoffs: format!("{prefix}handoffs"),
            channel,
            prefix: prefix.to_string(),
        }
    }

    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    fn table(&self, name: &str) -> String {
        format!("\"{}{name}\"", self.prefix)
    }

    /// The tables, created if absent.
    fn create(&self) -> String {
        let (a, h, s, x, n) = (
            self.table("accounts"),
            self.table("handoffs"),
            self.table("spent"),
            self.table("aside"),
            self.table("nodes"),
        );
        let spent_index = format!("\"{}spent_by_account\"", self.prefix);
        format!(
            "CREATE TABLE IF NOT EXISTS {a} (account text PRIMARY KEY, record bytea, \
               version bigint NOT NULL DEFAULT 0, holder text, epoch bigint NOT NULL DEFAULT 0, \
               lease_expires timestamptz);
             CREATE TABLE IF NOT EXISTS {h} (account text PRIMARY KEY, handoff bytea NOT NULL, \
               at timestamptz NOT NULL);
             CREATE TABLE IF NOT EXISTS {s} (fingerprint text PRIMARY KEY, account text NOT NULL, \
               at timestamptz NOT NULL, kind text NOT NULL);
             CREATE INDEX IF NOT EXISTS {spent_index} ON {s} (account, at);
             CREATE TABLE IF NOT EXISTS {x} (account text NOT NULL, name text NOT NULL, \
               record bytea NOT NULL, at timestamptz NOT NULL, PRIMARY KEY (account, name));
             CREATE TABLE IF NOT EXISTS {n} (node_id text PRIMARY KEY, seen timestamptz NOT NULL);"
        )
    }

    /// Creates the tables if absent and returns the schema version found, in one
    /// transaction under an advisory lock named after the prefix.
    pub(super) async fn ensure(&self, client: &mut Client) -> Result<i32, tokio_postgres::Error> {
        let version_table = self.table("schema");
        let tx = client.transaction().await?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            &[&format!("tokend schema {}", self.prefix)],
        )
        .await?;
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {version_table} \
               (only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row), version integer NOT NULL)"
        ))
        .await?;
        let found = tx
            .query_opt(&format!("SELECT version FROM {version_table}"), &[])
            .await?;
        let version = match found {
            Some(row) => row.get(0),
            None => {
                tx.batch_execute(&self.create()).await?;
                tx.execute(
                    &format!("INSERT INTO {version_table} (version) VALUES ($1)"),
                    &[&SCHEMA_VERSION],
                )
                .await?;
                SCHEMA_VERSION
            }
        };
        tx.commit().await?;
        Ok(version)
    }
}
