//! Who is calling (SPEC §8): OAuth 2.0 bearer tokens in JWT form, checked against the issuer's
//! published keys, and the scope each route needs.
//!
//! - [`credentials`]: finding the token in a request (the `Authorization` header, nowhere else).
//! - [`jwks`]: the issuer's key set, fetched or read, cached and refreshed.
//! - [`verifier`]: checking a token against it, with a cache of tokens already verified.
//!
//! The reason for a rejection is logged and counted (`auth_rejections_total{reason}`), never the
//! token itself.

pub mod credentials;
pub mod jwks;
pub mod verifier;

use std::sync::Arc;

use common::config::AuthConfig;
use prometheus::IntCounterVec;

use crate::auth::jwks::KeySet;
use crate::auth::verifier::Verifier;
use crate::metrics::ApiMetrics;

/// A permission a route needs and a token grants (claim `scope` or `scp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// GET a user, the list, a user's stats.
    UsersRead,
    /// POST, PUT, DELETE users.
    UsersWrite,
    /// GET an event, the list.
    EventsRead,
    /// POST events.
    EventsWrite,
}

impl Scope {
    /// Every scope, in the order of their bits.
    pub const ALL: [Self; 4] = [Self::UsersRead, Self::UsersWrite, Self::EventsRead, Self::EventsWrite];

    /// The scope's name in tokens and in the OpenAPI document.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::UsersRead => "users:read",
            Self::UsersWrite => "users:write",
            Self::EventsRead => "events:read",
            Self::EventsWrite => "events:write",
        }
    }

    const fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// The scopes a token grants, as bits (unknown scope names are ignored).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scopes(u8);

impl Scopes {
    /// The scopes among these names.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        Self(
            names
                .into_iter()
                .filter_map(|name| Scope::ALL.into_iter().find(|scope| scope.as_str() == name))
                .fold(0, |bits, scope| bits | scope.bit()),
        )
    }

    /// Whether `scope` is granted.
    pub fn grants(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }
}

/// The authenticated caller: the token's `client_id` claim, else its `sub`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// What rate limits and logs know the caller by.
    pub id: Arc<str>,
}

/// Why a request was not let through. Each maps to one response in `http::error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// No usable credentials: 401 `unauthorized`.
    #[error("{message}")]
    Unauthorized {
        /// Metric label.
        reason: &'static str,
        /// Told to the client.
        message: &'static str,
    },
    /// A token that fails a check: 401 `invalid_token`.
    #[error("{message}")]
    InvalidToken {
        /// Metric label.
        reason: &'static str,
        /// Told to the client (which check failed, never the token).
        message: &'static str,
    },
    /// A valid token without the route's scope: 403 `insufficient_scope`.
    #[error("the access token does not grant the scope {}", .0.as_str())]
    InsufficientScope(Scope),
    /// No key set has been loaded yet, so nothing can be verified: 503, retry.
    #[error("the issuer's keys are not loaded yet")]
    KeysNotLoaded,
}

impl Rejection {
    /// The `reason` label of `auth_rejections_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unauthorized { reason, .. } | Self::InvalidToken { reason, .. } => reason,
            Self::InsufficientScope(_) => "insufficient_scope",
            Self::KeysNotLoaded => "keys_not_loaded",
        }
    }
}

/// The api's authentication, as configured. Cheap to clone.
#[derive(Clone)]
pub enum Authenticator {
    /// `AUTH_MODE=none`: every request is let through, anonymous.
    Disabled,
    /// `AUTH_MODE=jwt`.
    Jwt(Arc<Verifier>),
}

impl Authenticator {
    /// Builds the authenticator; with `jwt`, starts loading the key set in the background.
    pub fn start(config: &AuthConfig, metrics: &ApiMetrics) -> anyhow::Result<Self> {
        match config {
            AuthConfig::Disabled => {
                tracing::warn!("AUTH_MODE=none: every /api/v1/ route is open to anyone who reaches the api");
                Ok(Self::Disabled)
            }
            AuthConfig::Jwt(jwt) => {
                let keys = KeySet::start(jwt, metrics.jwks_refreshes.clone(), metrics.jwks_keys.clone())?;
                Ok(Self::Jwt(Arc::new(Verifier::new(jwt, keys))))
            }
        }
    }

    /// Checks the request's credentials for a route that needs `scope`. `Ok(None)`: auth is off.
    pub async fn authenticate(
        &self,
        parts: &http::request::Parts,
        scope: Scope,
        rejections: &IntCounterVec,
    ) -> Result<Option<Client>, Rejection> {
        let Self::Jwt(verifier) = self else { return Ok(None) };
        let result = async {
            let token = credentials::bearer_token(&parts.headers, parts.uri.query())?;
            let (client, scopes) = verifier.verify(token).await?;
            if scopes.grants(scope) { Ok(Some(client)) } else { Err(Rejection::InsufficientScope(scope)) }
        }
        .await;
        if let Err(rejection) = &result {
            rejections.with_label_values(&[rejection.reason()]).inc();
            // Debug: unauthenticated traffic must not be able to flood the logs; the metric counts it.
            tracing::debug!(reason = rejection.reason(), error = %rejection, "request not authenticated");
        }
        result
    }

    /// Whether requests can be authenticated (a key set is loaded, or auth is off).
    pub fn is_ready(&self) -> bool {
        match self {
            Self::Disabled => true,
            Self::Jwt(verifier) => verifier.keys().is_loaded(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_read_by_name_and_unknown_ones_ignored() {
        let scopes = Scopes::from_names("users:read events:write openid users:admin".split(' '));
        assert!(scopes.grants(Scope::UsersRead) && scopes.grants(Scope::EventsWrite));
        assert!(!scopes.grants(Scope::UsersWrite) && !scopes.grants(Scope::EventsRead));
        assert_eq!(Scopes::from_names([]), Scopes::default());
    }
}
