DROP TRIGGER events_count_delete ON events;
DROP TRIGGER events_count_insert ON events;
DROP TRIGGER users_count_delete ON users;
DROP TRIGGER users_count_insert ON users;
DROP FUNCTION row_count(text);
DROP FUNCTION row_counts_add();
DROP TABLE row_counts;
