-- The api sums the counter shards itself: a SQL function around the sum was planned again on every
-- call, costing more PostgreSQL CPU than the list page it served.
DROP FUNCTION row_count(text);
