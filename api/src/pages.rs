//! What the list endpoints share: exact totals from the trigger-kept `row_counts` (so no page counts a
//! whole table), keyset positions, and telling from one extra row whether a next page exists.

use diesel::result::Error as DieselError;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use crate::http::query::{Cursor, Pagination};

diesel::define_sql_function! {
    /// The SQL function of migration `row_counts`: the sum of a table's counter shards.
    fn row_count(counted_table: diesel::sql_types::Text) -> diesel::sql_types::BigInt;
}

/// How many rows `table` has, from the counters its triggers keep. Takes a shared connection so it
/// can be pipelined with the page's own query (one round trip for both).
pub async fn total(conn: &AsyncPgConnection, table: &str) -> Result<i64, DieselError> {
    let mut conn = conn;
    diesel::select(row_count(table)).get_result(&mut conn).await
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
