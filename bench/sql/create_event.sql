\set n random(1, :users)
BEGIN;
INSERT INTO events (id, user_id, type, data) VALUES (gen_random_uuid(), md5(:n::text)::uuid, 'pgbench', '{"action":"login","n":1}') RETURNING id, user_id, type, data, status, created_at, processed_at;
INSERT INTO outbox (event_id, user_id, event_type, payload, request_id) VALUES (gen_random_uuid(), md5(:n::text)::uuid, 'bench', '{"id":"0192c5a5-0000-7000-8000-000000000000","user_id":"0192c5a5-0000-7000-8000-000000000000","type":"bench","data":{"action":"login","n":1},"timestamp":"2026-01-01T00:00:00.000000Z"}', 'bench-request-id');
COMMIT;
