-- Answers to writes sent with an `Idempotency-Key` (SPEC §10), one row per client and key, written in
-- the same transaction as the write it answers: the row exists if and only if the write committed.
-- A retry with the same client and key is answered from here (`method`, `path` and `body_sha256`
-- tell a true retry from a reuse of the key for another request). Rows past `expires_at` are
-- ignored by lookups and deleted by the api's expiry job in bounded batches.
CREATE TABLE idempotency_keys (
    client_id        text        NOT NULL,
    idempotency_key  text        NOT NULL,
    method           text        NOT NULL,
    path             text        NOT NULL,
    -- SHA-256 (hex) of the request body in canonical JSON (keys sorted, no insignificant space).
    body_sha256      text        NOT NULL,
    status           int4        NOT NULL,
    location         text,
    response_body    bytea       NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    PRIMARY KEY (client_id, idempotency_key)
);

-- The expiry job's scan: oldest first, a batch at a time.
CREATE INDEX idempotency_keys_expires_at_idx ON idempotency_keys (expires_at);
