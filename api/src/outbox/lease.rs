//! The publisher's lease: which api replica publishes the outbox, and for how long.
//!
//! One row in `outbox_publisher` holds an epoch and an expiry set from the database's clock. A
//! replica takes the lease when it has expired (incrementing the epoch), keeps it by renewing it
//! well before it expires, and gives it up at shutdown. Whatever stops the holder — killed, frozen,
//! cut off from PostgreSQL, a stalled Kafka connection (it stops renewing, see `relay`) — the lease
//! expires and another replica takes it. The holder never trusts a lease longer than its own
//! monotonic clock allows (measured from *before* the renewal was sent, so never later than the
//! database's expiry), and every row it reads to publish is read under its epoch, so a holder that
//! resumes after losing the lease publishes nothing more. Why a lease and not the session-scoped
//! advisory lock used before: see docs/ARCHITECTURE.md, "Outbox and relay".

use std::time::Duration;

use common::db::prepared::{Bind, Prepared};
use diesel::QueryableByName;
use diesel::sql_types::BigInt;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use tokio::time::Instant;

/// Lease timings derived from `OUTBOX_TAKEOVER_TIMEOUT` (T). A lease lasts T/2 and is renewed every
/// T/10; a standby tries to take it every T/10. A holder that stops making progress loses it at most
/// T/2 after its last renewal and a standby notices within T/10 more, so another replica publishes
/// within T of the holder's last sign of life, with room left for the statements' own latency.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// How long a lease lasts without renewal.
    pub duration: Duration,
    /// How often the holder renews, and how often a standby tries to take over.
    pub renew_every: Duration,
}

impl Timings {
    /// The timings for a takeover within `takeover_timeout`.
    pub fn new(takeover_timeout: Duration) -> Self {
        Self { duration: takeover_timeout / 2, renew_every: takeover_timeout / 10 }
    }
}

/// A lease this replica holds (or held: see [`Lease::valid_until`]).
#[derive(Debug, Clone, Copy)]
pub struct Lease {
    epoch: i64,
    /// Sent the last successful renewal (or the acquisition) at this instant.
    renewed_from: Instant,
    timings: Timings,
}

#[derive(QueryableByName)]
struct Epoch {
    #[diesel(sql_type = BigInt)]
    epoch: i64,
}

/// Takes the lease if it expired, or if `previous` is the epoch this replica held last (it lost its
/// session, not the lease). Either way the epoch moves on, fencing whatever the previous holder
/// still had under way.
const ACQUIRE: &str = "UPDATE outbox_publisher \
     SET epoch = epoch + 1, expires_at = clock_timestamp() + $1 * interval '1 millisecond' \
     WHERE expires_at <= clock_timestamp() OR epoch = $2 RETURNING epoch";

/// Extends the lease, if its epoch is still ours.
const RENEW: &str = "UPDATE outbox_publisher \
     SET expires_at = clock_timestamp() + $1 * interval '1 millisecond' WHERE epoch = $2 RETURNING epoch";

/// Lets a standby take over at once.
const RELEASE: &str = "UPDATE outbox_publisher SET expires_at = '-infinity' WHERE epoch = $1 RETURNING epoch";

impl Lease {
    /// Takes the lease if it is free; `previous` is the epoch this replica last held, if any.
    pub async fn acquire(
        conn: &mut AsyncPgConnection,
        timings: Timings,
        previous: Option<i64>,
    ) -> diesel::QueryResult<Option<Lease>> {
        let renewed_from = Instant::now();
        let binds = vec![Bind::BigInt(millis(timings.duration)), Bind::BigInt(previous.unwrap_or(-1))];
        let taken: Vec<Epoch> = Prepared::new(ACQUIRE, binds).load(conn).await?;
        Ok(taken.into_iter().next().map(|row| Lease { epoch: row.epoch, renewed_from, timings }))
    }

    /// Extends the lease; `false` if another replica has taken it.
    pub async fn renew(&mut self, conn: &mut AsyncPgConnection) -> diesel::QueryResult<bool> {
        let sent_at = Instant::now();
        let binds = vec![Bind::BigInt(millis(self.timings.duration)), Bind::BigInt(self.epoch)];
        let renewed: Vec<Epoch> = Prepared::new(RENEW, binds).load(conn).await?;
        if renewed.is_empty() {
            return Ok(false);
        }
        self.renewed_from = sent_at;
        Ok(true)
    }

    /// Gives the lease up so that a standby takes over without waiting for it to expire.
    pub async fn release(self, conn: &mut AsyncPgConnection) -> diesel::QueryResult<()> {
        let _: Vec<Epoch> = Prepared::new(RELEASE, vec![Bind::BigInt(self.epoch)]).load(conn).await?;
        Ok(())
    }

    /// The epoch under which this replica publishes.
    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    /// Until then the database cannot have given the lease to anyone else.
    pub fn valid_until(&self) -> Instant {
        self.renewed_from + self.timings.duration
    }

    /// When the holder renews next.
    pub fn renewal_due(&self) -> Instant {
        self.renewed_from + self.timings.renew_every
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lapsed_holder_is_replaced_within_the_takeover_timeout() {
        let timeout = Duration::from_secs(10);
        let timings = Timings::new(timeout);
        // Last renewal just before the holder froze; the lease runs out, then a standby's next try.
        let worst_case = timings.duration + timings.renew_every;
        assert!(worst_case < timeout, "{worst_case:?}");
        assert!(timings.renew_every < timings.duration / 2, "several renewals fit in one lease");
    }
}
