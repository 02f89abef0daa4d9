//! Reading a request body as JSON: content type, size cap, and errors a client can act on.

use bytes::Bytes;
use common::wire::FieldError;
use http::{HeaderMap, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde_json::error::Category;
use std::time::Duration;

use super::error::ApiError;

/// The largest request body accepted (SPEC §2: 1 MiB, else 413).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// How much of an oversized body is read and thrown away before the 413 goes out, and for how long.
/// A client that does not wait for `100 Continue` is still writing when the answer is ready, and a
/// socket closed with unread data makes the kernel reset the connection: the client then sees a
/// broken connection instead of the 413. Bounded so that a hostile client cannot hold the request
/// open by streaming forever.
const DISCARD_AT_MOST_BYTES: usize = 8 * MAX_BODY_BYTES;
const DISCARD_AT_MOST_FOR: Duration = Duration::from_secs(1);

/// Checks the content type and size, reads the body and deserializes it.
pub async fn read_json<T: DeserializeOwned>(headers: &HeaderMap, body: Incoming) -> Result<T, ApiError> {
    parse_json(&read_body(headers, body).await?)
}

/// Checks the content type and size and reads the body, for [`parse_json`] (a write with an
/// `Idempotency-Key` also fingerprints the bytes).
pub async fn read_body(headers: &HeaderMap, body: Incoming) -> Result<Bytes, ApiError> {
    require_json_content_type(headers)?;
    let declared_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    let mut body = body;
    if declared_length.is_some_and(|length| length > MAX_BODY_BYTES as u64) {
        discard(&mut body).await;
        return Err(ApiError::PayloadTooLarge(MAX_BODY_BYTES));
    }
    read_limited(&mut body).await
}

async fn read_limited(body: &mut Incoming) -> Result<Bytes, ApiError> {
    match Limited::new(&mut *body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => {
            discard(body).await;
            Err(ApiError::PayloadTooLarge(MAX_BODY_BYTES))
        }
        Err(err) => Err(ApiError::bad_request("body_read_failed", format!("could not read the request body: {err}"))),
    }
}

/// Reads the rest of a body that will not be used, within [`DISCARD_AT_MOST_BYTES`] and
/// [`DISCARD_AT_MOST_FOR`], so that the client has finished sending when the answer comes.
async fn discard(body: &mut Incoming) {
    let mut remaining = DISCARD_AT_MOST_BYTES;
    let drain = async {
        while let Some(Ok(frame)) = body.frame().await {
            let length = frame.data_ref().map_or(0, Bytes::len);
            match remaining.checked_sub(length) {
                Some(left) => remaining = left,
                None => return,
            }
        }
    };
    let _ = tokio::time::timeout(DISCARD_AT_MOST_FOR, drain).await;
}

/// `application/json`, with or without parameters such as `; charset=utf-8`.
fn require_json_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|media_type| media_type.trim().eq_ignore_ascii_case("application/json"));
    if is_json { Ok(()) } else { Err(ApiError::UnsupportedMediaType) }
}

/// Deserializes a body. Syntax errors are `invalid_json`; a well-formed body with a wrong field is a
/// validation error naming that field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    match bytes.iter().find(|byte| !byte.is_ascii_whitespace()) {
        None => return Err(ApiError::bad_request("invalid_json", "request body is empty; a JSON object is expected")),
        // serde would also accept a struct written as an array; the contract is objects only.
        Some(b'[') => return Err(ApiError::bad_request("invalid_body", "request body must be a JSON object")),
        Some(_) => {}
    }
    let deserializer = &mut serde_json::Deserializer::from_slice(bytes);
    let result: Result<T, _> = serde_path_to_error::deserialize(deserializer);
    let err = match result {
        Ok(value) => return Ok(value),
        Err(err) => err,
    };
    let path = err.path().to_string();
    let inner = err.into_inner();
    if inner.classify() != Category::Data {
        return Err(ApiError::bad_request("invalid_json", format!("malformed JSON: {inner}")));
    }
    let message = strip_position(&inner.to_string());
    // For an unknown field the path already ends with that field's name.
    let field = path;
    if field == "." {
        return Err(ApiError::bad_request("invalid_body", format!("request body must be a JSON object: {message}")));
    }
    Err(ApiError::Validation(vec![FieldError { field, message }]))
}

/// serde_json appends " at line 1 column 12", which means nothing to an API client.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(index) => message[..index].to_owned(),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::wire::UpdateUserRequest;
    use http::HeaderValue;

    fn field_of(err: ApiError) -> String {
        match err {
            ApiError::Validation(details) => details[0].field.clone(),
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn content_type_parameters_are_allowed_and_others_refused() {
        let mut headers = HeaderMap::new();
        assert!(require_json_content_type(&headers).is_err());
        for (value, ok) in [
            ("application/json", true),
            ("Application/JSON; charset=utf-8", true),
            ("text/plain", false),
            ("application/jsonx", false),
        ] {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
            assert_eq!(require_json_content_type(&headers).is_ok(), ok, "{value}");
        }
    }

    #[test]
    fn wrong_type_names_the_field() {
        let err = parse_json::<UpdateUserRequest>(br#"{"email": 5}"#).unwrap_err();
        assert_eq!(field_of(err), "email");
    }

    #[test]
    fn unknown_field_names_the_field() {
        let err = parse_json::<UpdateUserRequest>(br#"{"age": 5}"#).unwrap_err();
        assert_eq!(field_of(err), "age");
    }

    #[test]
    fn malformed_and_non_object_bodies_are_bad_requests() {
        for body in [&b"{"[..], b"", b"nul", b"[1]", b"\"x\""] {
            let err = parse_json::<UpdateUserRequest>(body).unwrap_err();
            assert!(matches!(err, ApiError::BadRequest { .. }), "{err:?}");
        }
    }
}
