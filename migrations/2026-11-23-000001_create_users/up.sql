CREATE TABLE users (
    id          uuid        PRIMARY KEY,
    email       text        NOT NULL,
    first_name  text        NOT NULL,
    last_name   text        NOT NULL,
    -- Bumped by every update: orders cache entries so a stale cache fill never wins over a newer write.
    version     bigint      NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Emails are unique case-insensitively; the application names this index in its 409 mapping.
CREATE UNIQUE INDEX users_email_lower_key ON users (lower(email));

-- Serves the list order (newest first, id as the tie-break) without a sort.
CREATE INDEX users_created_at_id_idx ON users (created_at DESC, id DESC);
