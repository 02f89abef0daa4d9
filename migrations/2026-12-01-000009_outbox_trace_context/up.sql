-- The W3C trace context of the request that wrote the row (SPEC §11), sent by the relay as the
-- message's `traceparent` and `tracestate` headers. NULL when traces are off: no cost then beyond
-- two null bits per row.
ALTER TABLE outbox ADD COLUMN traceparent text, ADD COLUMN tracestate text;
