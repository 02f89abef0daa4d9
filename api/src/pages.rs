//! What the list endpoints share: exact totals from the trigger-kept `row_counts` (so no page counts a
//! whole table), keyset positions, and telling from one extra row whether a next page exists.

use common::db::schema::row_counts;
use diesel::prelude::*;
use diesel::result::Error as DieselError;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use crate::http::query::{Cursor, Pagination};

/// How many rows `table` has: the sum of the counter shards its triggers keep (at most 32 rows).
/// Summed here because a plain select is prepared once per connection, while the SQL function that
/// summed them in PostgreSQL was planned again on every call (2-3× the CPU of the page's own query).
/// Takes a shared connection so it can be pipelined with the page's query (one round trip for both).
pub async fn total(conn: &AsyncPgConnection, table: &str) -> Result<i64, DieselError> {
    let mut conn = conn;
    let shards: Vec<i64> =
        row_counts::table.filter(row_counts::table_name.eq(table)).select(row_counts::count).load(&mut conn).await?;
    Ok(shards.iter().sum())
}

/// Rows to fetch for a page: one more than it shows, to know whether another page follows.
pub fn rows_to_fetch(page: Pagination) -> i64 {
    i64::from(page.limit) + 1
}

/// Cuts the extra row off and returns the page with the cursor of the next one, if there is one.
pub fn split<R>(mut rows: Vec<R>, page: Pagination, cursor_of: impl Fn(&R) -> Cursor) -> (Vec<R>, Option<String>) {
    let limit = page.limit as usize;
    if rows.len() <= limit {
        return (rows, None);
    }
    rows.truncate(limit);
    let next = rows.last().map(|row| cursor_of(row).encode());
    (rows, next)
}
