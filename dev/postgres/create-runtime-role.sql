-- docker-compose.yml's PostgreSQL runs this once, when its volume is new: the role the api and the
-- worker log in as. It owns nothing; `api migrate` (as postgres, the owner) grants it DML on the
-- service's tables (SPEC §9). A development password, as public as the rest of this directory.
CREATE ROLE highload_app LOGIN PASSWORD 'highload_app';
