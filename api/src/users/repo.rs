//! SQL for the users resource. Every write is one statement: no read-modify-write in the service.

use chrono::{SubsecRound, Utc};
use common::db::models::{NewOutboxRow, UserChangeset, UserRow};
use common::db::prepared::Bind;
use common::db::schema::users;
use diesel::prelude::*;
use diesel::result::Error as DieselError;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::validate::{ValidChanges, ValidUser};
use crate::http::query::Pagination;
use crate::outbox;
use crate::pages;

/// Name of the unique index on `lower(email)`, as PostgreSQL reports it in a violation.
pub const EMAIL_UNIQUE_INDEX: &str = "users_email_lower_key";

/// The user and the outbox row announcing it in one statement: atomic without BEGIN and COMMIT, so
/// one round trip where a transaction takes four.
const INSERT_WITH_MESSAGE: &str = "
WITH created AS (
    INSERT INTO users (id, email, first_name, last_name, version, created_at, updated_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7)
)
INSERT INTO outbox (event_id, user_id, event_type, payload, request_id, traceparent, tracestate)
    VALUES ($8, $9, $10, $11, $12, $13, $14)";

/// A new user as it will be stored. Its timestamps are taken here (at the precision PostgreSQL
/// keeps), so that the outbox message can be built before the insert.
pub fn new_row(user: ValidUser) -> UserRow {
    let now = Utc::now().trunc_subsecs(6);
    UserRow {
        id: Uuid::now_v7(),
        email: user.email,
        first_name: user.first_name,
        last_name: user.last_name,
        version: 1,
        created_at: now,
        updated_at: now,
    }
}

/// Inserts the user and its `user_created` outbox row (see [`INSERT_WITH_MESSAGE`]; the row's
/// values, then the outbox row's).
pub async fn insert_with_message(
    conn: &mut AsyncPgConnection,
    row: &UserRow,
    message: &NewOutboxRow,
) -> Result<(), DieselError> {
    let values = vec![
        Bind::Uuid(row.id),
        Bind::Text(&row.email),
        Bind::Text(&row.first_name),
        Bind::Text(&row.last_name),
        Bind::BigInt(row.version),
        Bind::Timestamp(row.created_at),
        Bind::Timestamp(row.updated_at),
    ];
    outbox::insert_with(conn, INSERT_WITH_MESSAGE, values, message).await
}

/// The user with this id, if any.
pub async fn find(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<UserRow>, DieselError> {
    users::table.find(id).select(UserRow::as_select()).first(conn).await.optional()
}

/// Applies a partial update in one `UPDATE … RETURNING`: columns not in `changes` keep whatever
/// value they have at that moment, so concurrent updates of different fields both survive.
pub async fn update(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    changes: &ValidChanges,
) -> Result<Option<UserRow>, DieselError> {
    let changeset = UserChangeset {
        email: changes.email.as_deref(),
        first_name: changes.first_name.as_deref(),
        last_name: changes.last_name.as_deref(),
    };
    diesel::update(users::table.find(id))
        .set((changeset, users::version.eq(users::version + 1), users::updated_at.eq(diesel::dsl::now)))
        .returning(UserRow::as_returning())
        .get_result(conn)
        .await
        .optional()
}

/// Deletes a user; returns the deleted row, or `None` if there was no such user.
pub async fn delete(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<UserRow>, DieselError> {
    diesel::delete(users::table.find(id)).returning(UserRow::as_returning()).get_result(conn).await.optional()
}

/// One page, newest first (`created_at DESC, id DESC`, served by an index), with one extra row when
/// another page follows (see [`pages::split`]), and the total count. The page and the count are
/// pipelined on the connection, and both queries have a fixed shape, so they are prepared once per
/// connection.
pub async fn list(conn: &AsyncPgConnection, page: Pagination) -> Result<(Vec<UserRow>, i64), DieselError> {
    let newest_first = users::table.select(UserRow::as_select()).order((users::created_at.desc(), users::id.desc()));
    let rows = async {
        let mut conn = conn;
        match page.after {
            None => pages::paged(newest_first, page).load(&mut conn).await,
            Some(cursor) => {
                let after_cursor = newest_first.filter(pages::after_cursor(users::created_at, users::id, cursor));
                pages::paged(after_cursor, page).load(&mut conn).await
            }
        }
    };
    tokio::try_join!(rows, pages::total(conn, "users"))
}
