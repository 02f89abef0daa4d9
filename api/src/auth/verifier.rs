//! Checking one bearer token: algorithm, key, signature, `iss`, `aud`, `exp`, `nbf` (SPEC §8).
//!
//! A client sends the same access token on every request until it expires, and a signature check
//! costs more than a cached GET does in all (RS256 and ES256 verification are tens of µs). So a token
//! that passed is remembered, with what it grants, until its `exp` (plus the clock skew) or until
//! the key set changes, whichever comes first. Only tokens that passed every check are remembered
//! (forged or malformed ones cannot fill the memory; a key removed from the JWKS stops working at the
//! next refresh), and only by their SHA-256, so the memory holds no usable token.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use common::config::JwtConfig;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;

use super::jwks::{ACCEPTED_ALGORITHMS, KeySet};
use super::{Client, Rejection, Scopes};

/// Tokens remembered at most. When full, expired ones go; if that is not enough, the memory starts
/// over (each live client's next request is verified again).
const MAX_REMEMBERED_TOKENS: usize = 10_000;

/// What a token must carry besides the registered claims `jsonwebtoken` checks.
#[derive(Deserialize)]
struct Claims {
    /// Checked present and unexpired by `jsonwebtoken` before this is read.
    exp: Option<f64>,
    sub: Option<String>,
    client_id: Option<String>,
    /// RFC 8693 / RFC 9068: space-separated.
    scope: Option<String>,
    /// The array form some issuers use instead (Okta; Azure AD sends a space-separated string).
    scp: Option<ScopeList>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ScopeList {
    Array(Vec<String>),
    Text(String),
}

/// A token that passed: who sent it, what it grants, and until when (seconds since the epoch,
/// clock skew included), verified against which key set.
#[derive(Clone)]
struct Verified {
    client: Client,
    scopes: Scopes,
    valid_until: u64,
    generation: u64,
}

/// Verifies tokens against the issuer's key set.
pub struct Verifier {
    keys: Arc<KeySet>,
    /// One `Validation` per accepted algorithm (the issuer, audience and leeway are the same).
    validations: HashMap<Algorithm, Validation>,
    leeway: u64,
    verified: RwLock<HashMap<TokenDigest, Verified>>,
}

impl Verifier {
    /// A verifier for tokens of `config`'s issuer and audience, using `keys`.
    pub fn new(config: &JwtConfig, keys: Arc<KeySet>) -> Self {
        let leeway = config.clock_skew.as_secs();
        let validations = ACCEPTED_ALGORITHMS
            .into_iter()
            .map(|algorithm| {
                let mut validation = Validation::new(algorithm);
                validation.leeway = leeway;
                validation.validate_nbf = true;
                validation.set_issuer(&[&config.issuer]);
                validation.set_audience(&[&config.audience]);
                validation.set_required_spec_claims(&["exp", "iss", "aud"]);
                (algorithm, validation)
            })
            .collect();
        Self { keys, validations, leeway, verified: RwLock::new(HashMap::new()) }
    }

    /// The key set.
    pub fn keys(&self) -> &KeySet {
        &self.keys
    }

    /// The caller and the scopes its token grants, or why the token is refused.
    pub async fn verify(&self, token: &str) -> Result<(Client, Scopes), Rejection> {
        let now = jsonwebtoken::get_current_timestamp();
        let generation = self.keys.generation();
        let digest = digest(token);
        if let Some(verified) = self.remembered(&digest)
            && Some(verified.generation) == generation
            && now <= verified.valid_until
        {
            return Ok((verified.client, verified.scopes));
        }
        let verified = self.check(token, now).await?;
        let result = (verified.client.clone(), verified.scopes);
        self.remember(digest, verified, now);
        Ok(result)
    }

    fn remembered(&self, digest: &TokenDigest) -> Option<Verified> {
        self.verified.read().ok()?.get(digest).cloned()
    }

    fn remember(&self, digest: TokenDigest, verified: Verified, now: u64) {
        if let Ok(mut remembered) = self.verified.write() {
            if remembered.len() >= MAX_REMEMBERED_TOKENS {
                remembered.retain(|_, entry| now <= entry.valid_until);
            }
            if remembered.len() >= MAX_REMEMBERED_TOKENS {
                remembered.clear();
            }
            remembered.insert(digest, verified);
        }
    }

    async fn check(&self, token: &str, now: u64) -> Result<Verified, Rejection> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid("malformed", "the token is not a JWT"))?;
        let validation = self.validations.get(&header.alg).ok_or_else(|| {
            invalid("algorithm", "the token's algorithm is not accepted (RS256, PS256, ES256 or EdDSA only)")
        })?;
        let kid = header.kid.ok_or_else(|| invalid("unknown_key", "the token names no key (kid)"))?;
        let mut keys = self.keys.current().ok_or(Rejection::KeysNotLoaded)?;
        if keys.get(&kid).is_none() {
            self.keys.refresh_for_unknown_kid().await;
            keys = self.keys.current().ok_or(Rejection::KeysNotLoaded)?;
        }
        let key = keys.get(&kid).ok_or_else(|| invalid("unknown_key", "the token's key (kid) is not the issuer's"))?;
        if !key.algorithms.contains(&header.alg) {
            return Err(invalid("algorithm", "the token's algorithm does not match its key"));
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &key.decoding, validation).map_err(rejection)?.claims;
        let named = |id: &Option<String>| id.clone().filter(|id| !id.is_empty());
        let client = named(&claims.client_id)
            .or_else(|| named(&claims.sub))
            .ok_or_else(|| invalid("claims", "the token names no client (client_id or sub)"))?;
        let scopes = match (&claims.scope, &claims.scp) {
            (Some(scope), _) | (None, Some(ScopeList::Text(scope))) => Scopes::from_names(scope.split(' ')),
            (None, Some(ScopeList::Array(scopes))) => Scopes::from_names(scopes.iter().map(String::as_str)),
            (None, None) => Scopes::default(),
        };
        // `exp` passed its check, so it is a number not in the past; the cast saturates anyway.
        let valid_until = (claims.exp.unwrap_or_default() as u64).saturating_add(self.leeway).max(now);
        Ok(Verified { client: Client { id: client.into() }, scopes, valid_until, generation: keys.generation })
    }
}

/// What a token is remembered by.
type TokenDigest = [u8; 32];

fn digest(token: &str) -> TokenDigest {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut bytes = [0; 32];
    bytes.copy_from_slice(digest.as_ref());
    bytes
}

fn invalid(reason: &'static str, message: &'static str) -> Rejection {
    Rejection::InvalidToken { reason, message }
}

/// `jsonwebtoken`'s error as the check that failed.
fn rejection(err: jsonwebtoken::errors::Error) -> Rejection {
    match err.kind() {
        ErrorKind::ExpiredSignature => invalid("expired", "the token has expired"),
        ErrorKind::ImmatureSignature => invalid("not_yet_valid", "the token is not valid yet (nbf)"),
        ErrorKind::InvalidIssuer => invalid("issuer", "the token's issuer (iss) is not trusted"),
        ErrorKind::InvalidAudience => invalid("audience", "the token is not meant for this api (aud)"),
        ErrorKind::InvalidSignature => invalid("signature", "the token's signature does not verify"),
        ErrorKind::InvalidAlgorithm => invalid("algorithm", "the token's algorithm does not match its key"),
        ErrorKind::MissingRequiredClaim(_) | ErrorKind::InvalidClaimFormat(_) => {
            invalid("claims", "the token lacks a required claim (exp, iss, aud) or has a malformed one")
        }
        _ => invalid("malformed", "the token is not a well-formed JWT"),
    }
}
