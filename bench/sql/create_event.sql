\set n random(1, :users)
BEGIN;
INSERT INTO events (id, user_id, type, data) VALUES (gen_random_uuid(), md5(:n::text)::uuid, 'pgbench', '{"action":"login","n":1}') RETURNING id, user_id, type, data, status, created_at, processed_at;
-- The message is keyed by the user like the api's, so the worker meets pgbench's messages spread
-- over its lanes as it meets real traffic (one shared key would queue them all in one lane).
INSERT INTO outbox (event_id, user_id, event_type, payload, request_id) VALUES (gen_random_uuid(), md5(:n::text)::uuid, 'pgbench', '{"id":"' || gen_random_uuid() || '","user_id":"' || md5(:n::text)::uuid || '","type":"pgbench","data":{"action":"login","n":1},"timestamp":"2026-01-01T00:00:00.000000Z"}', 'bench-request-id');
COMMIT;
