-- Exact row counts for the lists' `total`, kept by triggers so a list page never counts a whole table
-- (count(*) over 100k users costs milliseconds of CPU per request). Each counter is split into
-- shards picked by the writing backend, so concurrent inserts rarely wait on one another's row lock;
-- a count is the sum of a table's shards.
CREATE TABLE row_counts (
    table_name  text    NOT NULL,
    shard       integer NOT NULL,
    count       bigint  NOT NULL,
    PRIMARY KEY (table_name, shard)
);

CREATE FUNCTION row_counts_add() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    delta bigint;
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT count(*) INTO delta FROM changed_rows;
    ELSE
        SELECT -count(*) INTO delta FROM changed_rows;
    END IF;
    IF delta <> 0 THEN
        INSERT INTO row_counts (table_name, shard, count) VALUES (TG_TABLE_NAME, pg_backend_pid() % 32, delta)
        ON CONFLICT (table_name, shard) DO UPDATE SET count = row_counts.count + EXCLUDED.count;
    END IF;
    RETURN NULL;
END $$;

-- A table's count: the sum of its shards.
CREATE FUNCTION row_count(counted_table text) RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT coalesce(sum(count), 0)::bigint FROM row_counts WHERE table_name = counted_table
$$;

-- Statement-level with transition tables: one counter update per statement, however many rows it
-- touched (bulk loads, and the events removed by a user's cascading delete).
CREATE TRIGGER users_count_insert AFTER INSERT ON users
    REFERENCING NEW TABLE AS changed_rows FOR EACH STATEMENT EXECUTE FUNCTION row_counts_add();
CREATE TRIGGER users_count_delete AFTER DELETE ON users
    REFERENCING OLD TABLE AS changed_rows FOR EACH STATEMENT EXECUTE FUNCTION row_counts_add();
CREATE TRIGGER events_count_insert AFTER INSERT ON events
    REFERENCING NEW TABLE AS changed_rows FOR EACH STATEMENT EXECUTE FUNCTION row_counts_add();
CREATE TRIGGER events_count_delete AFTER DELETE ON events
    REFERENCING OLD TABLE AS changed_rows FOR EACH STATEMENT EXECUTE FUNCTION row_counts_add();

-- Existing rows (taken under the tables' locks, so no write slips between the count and the triggers).
LOCK TABLE users, events IN SHARE ROW EXCLUSIVE MODE;
INSERT INTO row_counts (table_name, shard, count)
SELECT 'users', 0, count(*) FROM users UNION ALL SELECT 'events', 0, count(*) FROM events;
