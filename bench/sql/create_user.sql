\set n random(1, 2000000000)
BEGIN;
INSERT INTO users (id, email, first_name, last_name) VALUES (gen_random_uuid(), 'pgbench-' || :client_id || '-' || :n || '-' || random() || '@example.com', 'Bench', 'User') RETURNING id, email, first_name, last_name, version, created_at, updated_at;
INSERT INTO outbox (event_id, user_id, event_type, payload, request_id) VALUES (gen_random_uuid(), gen_random_uuid(), 'user_created', '{"id":"0192c5a5-0000-7000-8000-000000000000","user_id":"0192c5a5-0000-7000-8000-000000000000","type":"user_created","data":{"id":"0192c5a5-0000-7000-8000-000000000000","email":"bench@example.com","first_name":"Bench","last_name":"User","created_at":"2026-01-01T00:00:00.000000Z","updated_at":"2026-01-01T00:00:00.000000Z"},"timestamp":"2026-01-01T00:00:00.000000Z"}', 'bench-request-id');
COMMIT;
