CREATE FUNCTION row_count(counted_table text) RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT coalesce(sum(count), 0)::bigint FROM row_counts WHERE table_name = counted_table
$$;
