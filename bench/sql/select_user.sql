\set n random(1, :users)
SELECT id, email, first_name, last_name, version, created_at, updated_at FROM users WHERE id = md5(:n::text)::uuid;
