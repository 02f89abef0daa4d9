//! The API's one error type and the one place it becomes a status code and a JSON body.

use bytes::Bytes;
use common::wire::{ErrorBody, FieldError};
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

use crate::auth::Rejection;

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body or the query failed validation; one entry per bad field.
    #[error("request validation failed")]
    Validation(Vec<FieldError>),
    /// The request could not be read as intended (bad JSON, bad id, bad query string).
    #[error("{message}")]
    BadRequest {
        /// Machine code, e.g. `invalid_json`.
        code: &'static str,
        /// Human message.
        message: String,
    },
    /// The addressed resource does not exist.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// No route has this path.
    #[error("no route for this path")]
    RouteNotFound,
    /// The path exists, the method does not; `Allow` lists the ones that do.
    #[error("method not allowed")]
    MethodNotAllowed(String),
    /// The request conflicts with stored state.
    #[error("{message}")]
    Conflict {
        /// Machine code, e.g. `email_taken`.
        code: &'static str,
        /// Human message.
        message: String,
    },
    /// Another request with this client and `Idempotency-Key` is still being served (SPEC §10); the
    /// client may retry shortly.
    #[error("a request with this Idempotency-Key is still in progress; retry shortly")]
    IdempotencyKeyInUse,
    /// This client's `Idempotency-Key` already answered a request with another method, path or body.
    #[error("this Idempotency-Key was used for a different request (method, path or body)")]
    IdempotencyKeyMismatch,
    /// The body is not JSON.
    #[error("content type must be application/json")]
    UnsupportedMediaType,
    /// The body is over the cap.
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// A dependency the request needs is unavailable; the client may retry.
    #[error("service temporarily unavailable")]
    Unavailable(#[source] anyhow::Error),
    /// `MAX_INFLIGHT_REQUESTS` requests are already being served.
    #[error("server is overloaded; retry shortly")]
    Overloaded,
    /// The request took longer than `REQUEST_TIMEOUT`.
    #[error("request timed out")]
    Timeout,
    /// The caller is not authenticated, or not allowed this route (SPEC §8).
    #[error("{0}")]
    Auth(#[from] Rejection),
    /// The client is over its rate limit; it may retry after this many seconds.
    #[error("too many requests; retry after {0} s")]
    RateLimited(u64),
    /// A bug or an unexpected failure; details only go to the log.
    #[error("internal server error")]
    Internal(#[source] anyhow::Error),
}

/// Seconds a client is asked to wait before retrying a 503 or an `idempotency_key_in_use`.
const RETRY_AFTER_SECONDS: &str = "1";

impl ApiError {
    /// Shorthand for a [`ApiError::BadRequest`].
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest { code, message: message.into() }
    }

    /// Shorthand for a one-field [`ApiError::Validation`].
    pub fn invalid_field(field: &str, message: impl Into<String>) -> Self {
        Self::Validation(vec![FieldError { field: field.to_owned(), message: message.into() }])
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::Validation(_) | Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::NotFound(_) | Self::RouteNotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict { .. } | Self::IdempotencyKeyInUse => StatusCode::CONFLICT,
            Self::IdempotencyKeyMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unavailable(_) | Self::Timeout | Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Self::Auth(Rejection::Unauthorized { .. } | Rejection::InvalidToken { .. }) => StatusCode::UNAUTHORIZED,
            Self::Auth(Rejection::InsufficientScope(_)) => StatusCode::FORBIDDEN,
            Self::Auth(Rejection::KeysNotLoaded) => StatusCode::SERVICE_UNAVAILABLE,
            Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::Validation(_) => "validation_failed",
            Self::BadRequest { code, .. } | Self::Conflict { code, .. } => code,
            Self::NotFound(_) => "not_found",
            Self::RouteNotFound => "route_not_found",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::IdempotencyKeyInUse => "idempotency_key_in_use",
            Self::IdempotencyKeyMismatch => "idempotency_key_mismatch",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::Unavailable(_) => "service_unavailable",
            Self::Timeout => "request_timeout",
            Self::Overloaded => "overloaded",
            Self::Auth(Rejection::Unauthorized { .. }) => "unauthorized",
            Self::Auth(Rejection::InvalidToken { .. }) => "invalid_token",
            Self::Auth(Rejection::InsufficientScope(_)) => "insufficient_scope",
            Self::Auth(Rejection::KeysNotLoaded) => "service_unavailable",
            Self::RateLimited(_) => "rate_limited",
            Self::Internal(_) => "internal_error",
        }
    }

    /// The response for this error. Server-side causes are logged here, once, inside the request's
    /// span (which carries the request id); the body never carries them.
    pub fn into_response(self, request_id: &str) -> Response<Full<Bytes>> {
        match &self {
            Self::Internal(cause) => tracing::error!(error = format!("{cause:#}"), "request failed"),
            Self::Unavailable(cause) => tracing::warn!(error = format!("{cause:#}"), "dependency unavailable"),
            _ => {}
        }
        let status = self.status();
        let body = ErrorBody {
            error: self.to_string(),
            code: self.code().to_owned(),
            details: match self {
                Self::Validation(ref details) => Some(details.clone()),
                _ => None,
            },
            request_id: request_id.to_owned(),
        };
        let mut response = super::response::json(status, &body);
        let headers = response.headers_mut();
        match self {
            Self::MethodNotAllowed(allow) => {
                if let Ok(allow) = HeaderValue::from_str(&allow) {
                    headers.insert(header::ALLOW, allow);
                }
            }
            Self::Unavailable(_)
            | Self::Timeout
            | Self::Overloaded
            | Self::Auth(Rejection::KeysNotLoaded)
            | Self::IdempotencyKeyInUse => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECONDS));
            }
            Self::RateLimited(seconds) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            }
            Self::Auth(rejection) => {
                if let Some(challenge) = challenge(&rejection) {
                    headers.insert(header::WWW_AUTHENTICATE, challenge);
                }
            }
            _ => {}
        }
        response
    }
}

/// The `WWW-Authenticate` challenge of a rejection (RFC 6750 §3).
fn challenge(rejection: &Rejection) -> Option<HeaderValue> {
    match rejection {
        Rejection::Unauthorized { .. } => Some(HeaderValue::from_static(r#"Bearer realm="highload-microservice""#)),
        Rejection::InvalidToken { .. } => Some(HeaderValue::from_static(r#"Bearer error="invalid_token""#)),
        Rejection::InsufficientScope(scope) => {
            HeaderValue::from_str(&format!(r#"Bearer error="insufficient_scope", scope="{}""#, scope.as_str())).ok()
        }
        Rejection::KeysNotLoaded => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_do_not_leak_their_cause() {
        let response = ApiError::Internal(anyhow::anyhow!("password=hunter2")).into_response("r1");
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = format!("{:?}", response.body());
        assert!(!body.contains("hunter2"), "{body}");
    }

    #[test]
    fn method_not_allowed_carries_allow() {
        let response = ApiError::MethodNotAllowed("GET, POST".into()).into_response("r1");
        assert_eq!(response.headers()[header::ALLOW], "GET, POST");
    }

    #[test]
    fn idempotency_key_in_use_is_a_409_with_retry_after_and_a_mismatch_a_422() {
        let response = ApiError::IdempotencyKeyInUse.into_response("r1");
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let response = ApiError::IdempotencyKeyMismatch.into_response("r1");
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert!(!response.headers().contains_key(header::RETRY_AFTER));
    }

    #[test]
    fn unavailable_carries_retry_after() {
        let response = ApiError::Unavailable(anyhow::anyhow!("down")).into_response("r1");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }
}
