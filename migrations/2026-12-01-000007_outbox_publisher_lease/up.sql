-- The outbox publisher's lease (api/src/outbox/lease.rs; docs/ARCHITECTURE.md, "Outbox and relay").
-- One row: the replica whose lease has not expired publishes. Every takeover increments `epoch`,
-- and the holder's statements name the epoch it took, so a replica that froze or was cut off and
-- comes back finds its epoch gone and stops before it publishes again. `expires_at` is set from
-- the database's clock only, so the replicas' clocks never need to agree.
CREATE TABLE outbox_publisher (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    epoch bigint NOT NULL,
    expires_at timestamptz NOT NULL
);

INSERT INTO outbox_publisher (epoch, expires_at) VALUES (0, '-infinity');
