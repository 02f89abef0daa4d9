-- Client events. `data` keeps the JSON text exactly as the client sent it (jsonb would reorder keys).
CREATE TABLE events (
    id            uuid        PRIMARY KEY,
    user_id       uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    type          text        NOT NULL,
    data          text        NOT NULL,
    status        text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'processed', 'failed')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    processed_at  timestamptz
);

-- The list order, unfiltered and filtered by user or by type.
CREATE INDEX events_created_at_id_idx ON events (created_at DESC, id DESC);
CREATE INDEX events_user_id_created_at_id_idx ON events (user_id, created_at DESC, id DESC);
CREATE INDEX events_type_created_at_id_idx ON events (type, created_at DESC, id DESC);

-- Transactional outbox: written in the same transaction as the change it announces, deleted once Kafka
-- has acknowledged it. `id` gives the publishing order.
CREATE TABLE outbox (
    id          bigserial   PRIMARY KEY,
    event_id    uuid        NOT NULL,
    user_id     uuid        NOT NULL,
    event_type  text        NOT NULL,
    payload     text        NOT NULL,
    request_id  text,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Per-user activity counters kept by the worker; gone with the user.
CREATE TABLE user_event_stats (
    user_id        uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    type           text        NOT NULL,
    count          bigint      NOT NULL,
    last_event_at  timestamptz NOT NULL,
    PRIMARY KEY (user_id, type)
);
