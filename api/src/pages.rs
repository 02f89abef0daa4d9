//! What the list endpoints share: exact totals from the trigger-kept `row_counts` (so no page counts a
//! whole table), keyset positions and the filter that starts a page at one, a page's LIMIT/OFFSET, and
//! telling from one extra row whether a next page exists.

use chrono::{DateTime, Utc};
use common::db::schema::row_counts;
use diesel::dsl;
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::result::Error as DieselError;
use diesel::sql_types::{BigInt, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

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

/// The filter [`after_cursor`] builds.
pub type AfterCursor<CreatedAt, Id> =
    dsl::And<dsl::LtEq<CreatedAt, DateTime<Utc>>, dsl::Or<dsl::Lt<CreatedAt, DateTime<Utc>>, dsl::Lt<Id, Uuid>>>;

/// The rows after `cursor` in a list ordered `created_at DESC, id DESC`: `(created_at, id) < cursor`,
/// for any table with such columns.
///
/// Spelled with a fixed shape (a row comparison would need a raw SQL fragment, which diesel cannot
/// cache) and so that the index condition is `created_at <= …`: the walk starts at the cursor (rows
/// sharing the cursor's microsecond are filtered, not skipped by the index).
pub fn after_cursor<CreatedAt, Id>(created_at: CreatedAt, id: Id, cursor: Cursor) -> AfterCursor<CreatedAt, Id>
where
    CreatedAt: Expression<SqlType = Timestamptz> + Copy,
    Id: Expression<SqlType = diesel::sql_types::Uuid>,
{
    created_at.le(cursor.created_at).and(created_at.lt(cursor.created_at).or(id.lt(cursor.id)))
}

/// `query` (ordered, not yet limited) cut to `page`: one row more than the page shows, to know whether
/// another page follows, after skipping the rows of earlier pages unless it starts at a cursor.
pub fn paged<Q>(query: Q, page: Pagination) -> Paged<Q> {
    let offset = if page.after.is_some() { 0 } else { page.offset() };
    Paged { query, rows: page.limit + 1, offset }
}

/// A page query: `query LIMIT <rows> [OFFSET $n]`, the row count written into the SQL text.
///
/// Why not diesel's `.limit()`: it binds the limit, and with `LIMIT $n` PostgreSQL's generic plan
/// must assume a tenth of the table is wanted, so it never looks cheaper than a plan made for the
/// bound values and every execution of the prepared statement is planned again (pgbench, page and
/// total pipelined: ~20k/s with both bound against ~35k/s with literals). With the limit in the text,
/// each page size is its own prepared statement whose cached plan serves every call: at most
/// `MAX_LIMIT` per list query per connection, kept until the pool retires the connection. The offset
/// stays a parameter, left out for the first page and for pages that start at a cursor.
#[derive(Debug, Clone, Copy)]
pub struct Paged<Q> {
    query: Q,
    rows: u32,
    offset: i64,
}

impl<Q: Query> Query for Paged<Q> {
    type SqlType = Q::SqlType;
}

impl<Q: QueryFragment<Pg>> QueryFragment<Pg> for Paged<Q> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        self.query.walk_ast(out.reborrow())?;
        out.push_sql(" LIMIT ");
        out.push_sql(&self.rows.to_string());
        if self.offset > 0 {
            out.push_sql(" OFFSET ");
            out.push_bind_param::<BigInt, _>(&self.offset)?;
        }
        Ok(())
    }
}

impl<Q> QueryId for Paged<Q> {
    // The SQL text varies with the page size: statements are cached by their text.
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
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

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use common::db::schema::users;
    use uuid::Uuid;

    use super::*;

    fn sql_of(page: Pagination) -> String {
        let query = users::table.select(users::id).order(users::created_at.desc());
        diesel::debug_query::<Pg, _>(&paged(query, page)).to_string()
    }

    #[test]
    fn the_row_count_is_written_into_the_sql_and_only_later_pages_bind_an_offset() {
        let first = sql_of(Pagination { page: Some(1), after: None, limit: 10 });
        assert!(first.contains(" LIMIT 11 --"), "{first}");
        assert!(!first.contains("OFFSET"), "{first}");

        let third = sql_of(Pagination { page: Some(3), after: None, limit: 25 });
        assert!(third.contains(" LIMIT 26 OFFSET $1 -- binds: [50]"), "{third}");

        let cursor = Cursor { created_at: Utc::now(), id: Uuid::nil() };
        let after = sql_of(Pagination { page: None, after: Some(cursor), limit: 100 });
        assert!(after.contains(" LIMIT 101 --"), "{after}");
        assert!(!after.contains("OFFSET"), "{after}");
    }

    #[test]
    fn the_cursor_filter_bounds_created_at_for_the_index_and_breaks_ties_by_id() {
        let cursor = Cursor { created_at: Utc::now(), id: Uuid::nil() };
        let query = users::table.select(users::id).filter(after_cursor(users::created_at, users::id, cursor));
        let sql = diesel::debug_query::<Pg, _>(&query).to_string();
        let expected =
            r#"WHERE (("users"."created_at" <= $1) AND (("users"."created_at" < $2) OR ("users"."id" < $3)))"#;
        assert!(sql.contains(expected), "{sql}");
    }
}
