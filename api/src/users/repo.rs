//! SQL for the users resource. Every write is one statement: no read-modify-write in the service.

use common::db::models::{NewUserRow, UserChangeset, UserRow};
use common::db::schema::users;
use diesel::prelude::*;
use diesel::result::Error as DieselError;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::validate::{ValidChanges, ValidUser};
use crate::http::query::Pagination;
use crate::pages;

/// Name of the unique index on `lower(email)`, as PostgreSQL reports it in a violation.
pub const EMAIL_UNIQUE_INDEX: &str = "users_email_lower_key";

/// Inserts a user; the database sets the timestamps.
pub async fn insert(conn: &mut AsyncPgConnection, user: &ValidUser) -> Result<UserRow, DieselError> {
    diesel::insert_into(users::table)
        .values(NewUserRow {
            id: Uuid::now_v7(),
            email: &user.email,
            first_name: &user.first_name,
            last_name: &user.last_name,
        })
        .returning(UserRow::as_returning())
        .get_result(conn)
        .await
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
/// another page follows (see [`pages::split`]), and the total count.
pub async fn list(conn: &mut AsyncPgConnection, page: Pagination) -> Result<(Vec<UserRow>, i64), DieselError> {
    let mut query = users::table
        .select(UserRow::as_select())
        .order((users::created_at.desc(), users::id.desc()))
        .limit(pages::rows_to_fetch(page))
        .into_boxed();
    query = match page.after {
        Some(cursor) => query.filter(pages::listed_after(cursor)),
        None => query.offset(page.offset()),
    };
    let rows = query.load(conn).await?;
    let total = pages::row_count(conn, "users").await?;
    Ok((rows, total))
}
