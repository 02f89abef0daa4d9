-- A user's deletion rewrites that user's user_created/user_updated rows still in the outbox (SPEC §9,
-- api/src/outbox forget_user). The outbox is near-empty while Kafka keeps up, but holds the whole
-- backlog during an outage: without an index each deletion would read all of it inside its
-- transaction. Partial, so client events (the bulk of the inserts) pay nothing for it; the query
-- names the same two types literally, so even a generic plan can use it.
CREATE INDEX outbox_user_lifecycle_idx ON outbox (user_id) WHERE event_type IN ('user_created', 'user_updated');
