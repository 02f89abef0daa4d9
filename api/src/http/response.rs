//! Building successful responses.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use serde::Serialize;

/// The concrete response type of every handler.
pub type HttpResponse = Response<Full<Bytes>>;

const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// A JSON response. Serializing our own wire types cannot fail (string keys, no non-finite floats).
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> HttpResponse {
    let body = serde_json::to_vec(value).expect("wire types always serialize");
    json_bytes(status, Bytes::from(body))
}

/// A JSON response from an already-serialized body (e.g. a cache hit).
pub fn json_bytes(status: StatusCode, body: Bytes) -> HttpResponse {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, JSON);
    response
}

/// A plain-text response (the caller sets the exact content type).
pub fn text(status: StatusCode, body: String) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// A response with no body (204).
pub fn no_content() -> HttpResponse {
    empty(StatusCode::NO_CONTENT)
}

/// A response with this status and no body.
pub fn empty(status: StatusCode) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}
