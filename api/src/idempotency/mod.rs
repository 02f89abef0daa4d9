//! Idempotent writes (SPEC §10): `POST`, `PUT` and `DELETE` under `/api/v1/` accept an
//! `Idempotency-Key`; a retry with the same client and key gets the first answer again instead of a
//! second effect.
//!
//! How, in one place:
//! - The request pipeline ([`crate::service`]) reads the key ([`Key::from_headers`], 400 for a bad
//!   one) and the body, and builds an [`Idempotent`] request: the client, the key, and a fingerprint
//!   of what was asked (method, path, SHA-256 of the body in canonical JSON). It first answers from
//!   what is committed ([`replay`]): a stored answer to the same request is replayed, one to another
//!   request is 422, without validating or writing anything.
//! - Otherwise the handler runs its write through [`write`]: in one PostgreSQL transaction it takes a
//!   transaction-scoped advisory lock on the client and key (not obtained: another request with the
//!   key is in flight, 409 at once, no waiting), looks the key up again (a request that committed
//!   since is replayed), does the write with its outbox rows, and stores the answer. The answer is
//!   therefore stored exactly when the write commits: a failure (any 4xx or 5xx) rolls both back and
//!   a corrected retry runs, and a crash after commit leaves the answer for the retry.
//! - [`expiry`] deletes rows past `IDEMPOTENCY_TTL`; lookups ignore them before that.
//!
//! The lock lives in PostgreSQL, so it holds across replicas, and it goes with the transaction, so a
//! request whose api died holds nothing. Why a lock and not the row itself: a second insert of the
//! same key would wait for the first transaction to end, and answering 409 without waiting would
//! need a `lock_timeout` that also applies to the write's own statements.

pub mod expiry;
mod store;

use std::time::Duration;

use aws_lc_rs::digest::{SHA256, digest};
use bytes::Bytes;
use chrono::Utc;
use common::db::models::IdempotencyRow;
use diesel_async::AsyncPgConnection;
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderValue, StatusCode, header};

use crate::db::{self, DbPool};
use crate::http::error::ApiError;
use crate::http::response::{self, HttpResponse};

/// The request header carrying the key.
pub const KEY_HEADER: &str = "idempotency-key";

/// The response header marking a replayed answer.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// Longest key accepted (SPEC §10).
pub const MAX_KEY_LEN: usize = 255;

/// A valid `Idempotency-Key`: 1–255 printable ASCII characters (space included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key(String);

impl Key {
    /// The request's key: `None` without the header, 400 `invalid_idempotency_key` for a bad one
    /// (also for two of them: which one the client meant is anybody's guess).
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, ApiError> {
        let mut values = headers.get_all(KEY_HEADER).iter();
        let Some(value) = values.next() else { return Ok(None) };
        let invalid = |message: &str| ApiError::bad_request("invalid_idempotency_key", message);
        if values.next().is_some() {
            return Err(invalid("send one Idempotency-Key header, not several"));
        }
        let bytes = value.as_bytes();
        if bytes.is_empty() || bytes.len() > MAX_KEY_LEN || !bytes.iter().all(|byte| (b' '..=b'~').contains(byte)) {
            return Err(invalid("Idempotency-Key must be 1 to 255 printable ASCII characters"));
        }
        // Printable ASCII is UTF-8.
        Ok(Some(Self(String::from_utf8_lossy(bytes).into_owned())))
    }
}

/// A write request with a key: who sent it, the key, and what it asked for.
#[derive(Debug, Clone)]
pub struct Idempotent {
    client: String,
    key: Key,
    method: String,
    path: String,
    body_sha256: String,
    ttl: Duration,
}

impl Idempotent {
    /// `client` is the caller's identity (the key's scope); `path` is taken without a trailing
    /// slash, since both spellings are the same route; `ttl` is how long the answer is kept.
    pub fn new(client: String, key: Key, method: &str, path: &str, body: &[u8], ttl: Duration) -> Self {
        let path = match path.strip_suffix('/') {
            Some(stripped) if !stripped.is_empty() => stripped,
            _ => path,
        };
        Self { client, key, method: method.to_owned(), path: path.to_owned(), body_sha256: body_sha256(body), ttl }
    }

    /// Whether `row` answers this very request (not another one sent with the same key).
    fn matches(&self, row: &IdempotencyRow) -> bool {
        row.method == self.method && row.path == self.path && row.body_sha256 == self.body_sha256
    }

    /// A 64-bit key for PostgreSQL's advisory locks. Another client and key hashing to the same
    /// value (odds 2⁻⁶⁴ per pair in flight at once) would only see a spurious 409 while both run.
    fn lock_key(&self) -> i64 {
        let mut input = Vec::with_capacity(self.client.len() + 1 + self.key.0.len());
        input.extend_from_slice(self.client.as_bytes());
        input.push(0);
        input.extend_from_slice(self.key.0.as_bytes());
        let hash = digest(&SHA256, &input);
        i64::from_be_bytes(hash.as_ref()[..8].try_into().expect("SHA-256 has 32 bytes"))
    }

    /// The row storing `answer` as this request's.
    fn row(&self, answer: &Answer) -> IdempotencyRow {
        let ttl = chrono::Duration::from_std(self.ttl).unwrap_or(chrono::Duration::MAX);
        IdempotencyRow {
            client_id: self.client.clone(),
            idempotency_key: self.key.0.clone(),
            method: self.method.clone(),
            path: self.path.clone(),
            body_sha256: self.body_sha256.clone(),
            status: i32::from(answer.status.as_u16()),
            location: answer.location.clone(),
            response_body: answer.body.to_vec(),
            expires_at: Utc::now() + ttl,
        }
    }
}

/// SHA-256 (hex) of the body in canonical JSON (object keys sorted, no insignificant white space),
/// so that the same JSON sent with other spacing or key order is the same request. Canonical only
/// when that loses nothing: a body whose numbers would not be written back exactly as sent (beyond
/// 64-bit integers or double precision, `1.00`, `1e2`) or that repeats a key (the parse keeps only
/// one) is hashed as sent, so it matches only itself, byte for byte. So does a body that is not JSON
/// (its request fails and is never stored, but it must still differ from any stored one).
fn body_sha256(body: &[u8]) -> String {
    let canonical = serde_json::from_slice::<serde_json::Value>(body).ok().and_then(|value| {
        let mut out = Vec::with_capacity(body.len());
        canonical_json(&value, &mut out);
        (JsonTokens::of(body) == JsonTokens::of(&out)).then(|| [&b"j"[..], &out].concat())
    });
    let hashed = canonical.unwrap_or_else(|| [&b"r"[..], body].concat());
    digest(&SHA256, &hashed).as_ref().iter().map(|byte| format!("{byte:02x}")).collect()
}

/// What canonical JSON must keep of a text: its number literals, as written, and how many
/// name-value pairs it has (a repeated name is one pair fewer once parsed).
#[derive(PartialEq, Eq, Debug)]
struct JsonTokens<'a> {
    numbers: Vec<&'a [u8]>,
    pairs: usize,
}

impl<'a> JsonTokens<'a> {
    /// Scans well-formed JSON text (strings skipped, escapes included).
    fn of(text: &'a [u8]) -> Self {
        let (mut numbers, mut pairs, mut index) = (Vec::new(), 0, 0);
        while index < text.len() {
            match text[index] {
                b'"' => {
                    index += 1;
                    while index < text.len() && text[index] != b'"' {
                        index += if text[index] == b'\\' { 2 } else { 1 };
                    }
                    index += 1;
                }
                b':' => {
                    pairs += 1;
                    index += 1;
                }
                b'-' | b'0'..=b'9' => {
                    let start = index;
                    while index < text.len() && matches!(text[index], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') {
                        index += 1;
                    }
                    numbers.push(&text[start..index]);
                }
                _ => index += 1,
            }
        }
        numbers.sort_unstable();
        Self { numbers, pairs }
    }
}

/// Writes `value` with object keys in sorted order, whatever order the map type keeps.
fn canonical_json(value: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (index, (name, value)) in entries.into_iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(&serde_json::to_vec(name).expect("a string serializes"));
                out.push(b':');
                canonical_json(value, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                canonical_json(item, out);
            }
            out.push(b']');
        }
        scalar => out.extend_from_slice(&serde_json::to_vec(scalar).expect("a scalar serializes")),
    }
}

/// A successful write's answer, as sent, stored and replayed.
#[derive(Debug, Clone)]
pub struct Answer {
    /// 200, 201 or 204.
    pub status: StatusCode,
    /// The `Location` header, for a creation.
    pub location: Option<String>,
    /// The JSON body (empty for 204).
    pub body: Bytes,
}

impl Answer {
    /// A JSON answer.
    pub fn json(status: StatusCode, body: Bytes) -> Self {
        Self { status, location: None, body }
    }

    /// 201 with the new resource's `Location`.
    pub fn created(location: String, body: Bytes) -> Self {
        Self { status: StatusCode::CREATED, location: Some(location), body }
    }

    /// 204, no body.
    pub fn no_content() -> Self {
        Self { status: StatusCode::NO_CONTENT, location: None, body: Bytes::new() }
    }

    /// The HTTP response.
    pub fn into_response(self) -> HttpResponse {
        let mut response = if self.body.is_empty() {
            response::empty(self.status)
        } else {
            response::json_bytes(self.status, self.body)
        };
        if let Some(location) = self.location.and_then(|location| HeaderValue::from_str(&location).ok()) {
            response.headers_mut().insert(header::LOCATION, location);
        }
        response
    }

    /// The HTTP response of a replay: the stored answer, marked `Idempotent-Replayed: true`.
    fn into_replay(self) -> HttpResponse {
        let mut response = self.into_response();
        response.headers_mut().insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
        response
    }

    fn from_row(row: IdempotencyRow) -> Result<Self, ApiError> {
        let status = u16::try_from(row.status)
            .ok()
            .and_then(|status| StatusCode::from_u16(status).ok())
            .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("stored idempotent answer has status {}", row.status)))?;
        Ok(Self { status, location: row.location, body: Bytes::from(row.response_body) })
    }
}

/// What became of a write sent with a key: the `outcome` label of `idempotent_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It ran, and its answer is stored.
    Stored,
    /// A stored answer was sent again.
    Replayed,
    /// 422: the key answered another request.
    Mismatch,
    /// 409: a request with the key was in flight.
    InUse,
    /// It failed (nothing stored).
    Failed,
}

impl Outcome {
    /// What `result`, the answer to a write with a key, says happened.
    pub fn of(result: &Result<HttpResponse, ApiError>) -> Self {
        match result {
            Ok(response) if response.headers().contains_key(REPLAYED_HEADER) => Self::Replayed,
            Ok(_) => Self::Stored,
            Err(ApiError::IdempotencyKeyMismatch) => Self::Mismatch,
            Err(ApiError::IdempotencyKeyInUse) => Self::InUse,
            Err(_) => Self::Failed,
        }
    }

    /// The metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::Replayed => "replayed",
            Self::Mismatch => "mismatch",
            Self::InUse => "in_use",
            Self::Failed => "failed",
        }
    }
}

/// How a handler's write runs when the request has no key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WithoutKey {
    /// It is one statement: no BEGIN and COMMIT (with a key it gets a transaction all the same).
    OneStatement,
    /// It needs a transaction.
    Transaction,
}

/// What [`write`] did.
pub enum Written<T> {
    /// The write ran and committed (with its answer stored, if the request had a key).
    Fresh {
        /// What the write returned, for the handler's work after commit (cache, relay signal).
        value: T,
        /// The answer to send.
        answer: Answer,
    },
    /// A request with this client and key had committed meanwhile: nothing was written, and this is
    /// the response to send.
    Replayed(HttpResponse),
}

impl Written<()> {
    /// The response to a create: a fresh write's answer, once the relay is woken for its outbox row,
    /// or the replay.
    pub fn into_created_response(self, signal: &crate::outbox::relay::OutboxSignal) -> HttpResponse {
        match self {
            Written::Fresh { answer, .. } => {
                signal.rows_committed();
                answer.into_response()
            }
            Written::Replayed(response) => response,
        }
    }
}

/// Runs a handler's write, which returns its value and its answer. With a key, it runs in one
/// transaction with the key's lock and lookup before it and the answer stored after it (see the
/// module's documentation); 409 `idempotency_key_in_use` while another request holds the key, 422
/// `idempotency_key_mismatch` when the key answered another request.
pub async fn write<T, F>(
    pool: &DbPool,
    request: Option<Idempotent>,
    without_key: WithoutKey,
    work: F,
) -> Result<Written<T>, ApiError>
where
    T: Send + 'static,
    F: for<'c> FnOnce(&'c mut AsyncPgConnection) -> BoxFuture<'c, Result<(T, Answer), ApiError>> + Send + 'static,
{
    let Some(request) = request else {
        let (value, answer) = match without_key {
            WithoutKey::OneStatement => db::detached(pool, work).await?,
            WithoutKey::Transaction => db::transaction(pool, work).await?,
        };
        return Ok(Written::Fresh { value, answer });
    };
    db::transaction(pool, move |conn| {
        Box::pin(async move {
            if !store::try_lock(conn, request.lock_key()).await? {
                return Err(ApiError::IdempotencyKeyInUse);
            }
            if let Some(row) = store::find(conn, &request.client, &request.key.0).await? {
                return answer_to(&request, row).map(Written::Replayed);
            }
            let (value, answer) = work(conn).await?;
            store::record(conn, &request.row(&answer)).await?;
            Ok(Written::Fresh { value, answer })
        })
    })
    .await
}

/// The stored answer to this client and key, if one is committed and live: replayed when it answers
/// this same request, 422 when it answers another. `None`: the request is to run.
pub async fn replay(pool: &DbPool, request: &Idempotent) -> Result<Option<HttpResponse>, ApiError> {
    let (client, key) = (request.client.clone(), request.key.0.clone());
    let row =
        pool.run(|conn| Box::pin(async move { Ok::<_, ApiError>(store::find(conn, &client, &key).await?) })).await?;
    row.map(|row| answer_to(request, row)).transpose()
}

fn answer_to(request: &Idempotent, row: IdempotencyRow) -> Result<HttpResponse, ApiError> {
    if !request.matches(&row) {
        return Err(ApiError::IdempotencyKeyMismatch);
    }
    Ok(Answer::from_row(row)?.into_replay())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(value: &[u8]) -> Result<Option<Key>, ApiError> {
        let mut headers = HeaderMap::new();
        headers.insert(KEY_HEADER, HeaderValue::from_bytes(value).unwrap());
        Key::from_headers(&headers)
    }

    #[test]
    fn keys_are_one_to_255_printable_ascii_characters() {
        assert_eq!(Key::from_headers(&HeaderMap::new()).unwrap(), None);
        assert!(key(b"a").unwrap().is_some());
        assert!(key(b"order 42: retry #1 ~ ok").unwrap().is_some());
        assert!(key(&[b'k'; 255]).unwrap().is_some());
        for bad in [&b""[..], &[b'k'; 256], b"tab\there", b"caf\xc3\xa9", b"\x80"] {
            assert!(matches!(key(bad), Err(ApiError::BadRequest { code: "invalid_idempotency_key", .. })), "{bad:?}");
        }
        let mut two = HeaderMap::new();
        two.append(KEY_HEADER, HeaderValue::from_static("a"));
        two.append(KEY_HEADER, HeaderValue::from_static("b"));
        assert!(Key::from_headers(&two).is_err());
    }

    #[test]
    fn the_same_json_is_the_same_body_and_anything_else_is_not() {
        let same = [&br#"{"a":1,"b":{"y":[1,2],"x":"s"}}"#[..], br#" { "b" : { "x":"s", "y":[1, 2] }, "a" : 1 } "#];
        assert_eq!(body_sha256(same[0]), body_sha256(same[1]));
        assert_ne!(body_sha256(br#"{"a":1}"#), body_sha256(br#"{"a":2}"#));
        assert_ne!(body_sha256(br#"{"a":[1,2]}"#), body_sha256(br#"{"a":[2,1]}"#));
        assert_ne!(body_sha256(b"{not json"), body_sha256(b"{not  json"));
        assert_eq!(body_sha256(b""), body_sha256(b""));
    }

    #[test]
    fn bodies_the_parse_would_blur_match_only_themselves() {
        // Beyond 64-bit integers and double precision, serde_json reads both as the same number.
        let big = [&br#"{"n":12345678901234567890123}"#[..], br#"{"n":12345678901234567890124}"#];
        assert_ne!(body_sha256(big[0]), body_sha256(big[1]));
        assert_eq!(body_sha256(big[0]), body_sha256(big[0]));
        // A repeated name keeps only its last value once parsed.
        assert_ne!(body_sha256(br#"{"a":1,"a":2}"#), body_sha256(br#"{"a":2}"#));
        // Numbers written another way are another body unless byte-identical.
        assert_ne!(body_sha256(br#"{"n":1.00}"#), body_sha256(br#"{"n":1.0}"#));
        // Strings that look like numbers or hold colons and escaped quotes change nothing.
        let tricky = [&br#"{"s":"1:2 \" 3","n":-2.5}"#[..], br#"{ "n" : -2.5 , "s" : "1:2 \" 3" }"#];
        assert_eq!(body_sha256(tricky[0]), body_sha256(tricky[1]));
    }

    #[test]
    fn a_request_matches_only_its_own_method_path_and_body() {
        let key = Key("k".into());
        let ttl = Duration::from_secs(60);
        let first = Idempotent::new("c".into(), key.clone(), "POST", "/api/v1/users/", br#"{"a":1}"#, ttl);
        let row = first.row(&Answer::no_content());
        assert!(Idempotent::new("c".into(), key.clone(), "POST", "/api/v1/users", br#"{ "a": 1 }"#, ttl).matches(&row));
        for (method, path, body) in [
            ("PUT", "/api/v1/users", &br#"{"a":1}"#[..]),
            ("POST", "/api/v1/events", br#"{"a":1}"#),
            ("POST", "/api/v1/users", br#"{"a":2}"#),
        ] {
            assert!(
                !Idempotent::new("c".into(), key.clone(), method, path, body, ttl).matches(&row),
                "{method} {path}"
            );
        }
        let other_client = Idempotent::new("d".into(), key, "POST", "/api/v1/users", br#"{"a":1}"#, ttl);
        assert_ne!(other_client.lock_key(), first.lock_key());
    }
}
