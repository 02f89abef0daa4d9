//! SQL of `idempotency_keys` and the key's advisory lock.

use chrono::Utc;
use common::db::models::IdempotencyRow;
use common::db::schema::idempotency_keys;
use diesel::prelude::*;
use diesel::result::Error as DieselError;
use diesel::sql_types::BigInt;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

diesel::define_sql_function! {
    /// Takes a lock released when the transaction ends; `false` at once if another session holds it.
    fn pg_try_advisory_xact_lock(key: BigInt) -> Bool;
}

/// Tries to take the transaction-scoped lock of a client and key (call inside the transaction).
pub(super) async fn try_lock(conn: &mut AsyncPgConnection, key: i64) -> Result<bool, DieselError> {
    diesel::select(pg_try_advisory_xact_lock(key)).get_result(conn).await
}

/// The live (unexpired) row of this client and key, if one is committed (or written earlier in this
/// transaction). Expiry is judged by the api's clock, the one that set `expires_at`.
pub(super) async fn find(
    conn: &mut AsyncPgConnection,
    client: &str,
    key: &str,
) -> Result<Option<IdempotencyRow>, DieselError> {
    idempotency_keys::table
        .find((client, key))
        .filter(idempotency_keys::expires_at.gt(Utc::now()))
        .select(IdempotencyRow::as_select())
        .first(conn)
        .await
        .optional()
}

/// Stores a request's answer (call in the transaction of the write it answers, holding the key's
/// lock). A row already there for the client and key can only be an expired one the expiry job has
/// not deleted yet (a live one would have been found under the same lock): it is replaced.
pub(super) async fn record(conn: &mut AsyncPgConnection, row: &IdempotencyRow) -> Result<(), DieselError> {
    diesel::insert_into(idempotency_keys::table)
        .values(row)
        .on_conflict((idempotency_keys::client_id, idempotency_keys::idempotency_key))
        .do_update()
        .set(row)
        .execute(conn)
        .await
        .map(drop)
}
