//! The issuer's signing keys: a JWK Set fetched over HTTP(S) or read from a file, kept in memory and
//! refreshed every `AUTH_JWKS_REFRESH`, and at once (at most every [`UNKNOWN_KID_REFRESH_INTERVAL`])
//! when a token names a key the set lacks, so keys rotate without a restart.
//!
//! A refresh that fails (server down, hanging, garbage, no usable key) keeps the last good set: a
//! JWKS server that goes away never stops valid tokens from working. Keys of any other kind than the
//! four accepted algorithms (HMAC secrets, encryption keys) are skipped, never used.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use common::backoff::Backoff;
use common::config::{JwksSource, JwtConfig};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use prometheus::{IntCounterVec, IntGauge};

/// The algorithms SPEC §8 accepts; `none` and every HMAC algorithm never are.
pub const ACCEPTED_ALGORITHMS: [Algorithm; 4] =
    [Algorithm::RS256, Algorithm::PS256, Algorithm::ES256, Algorithm::EdDSA];

/// Tokens naming an unknown `kid` trigger at most one refresh this often: a client sending made-up
/// key ids must not turn the api into a load generator against the issuer.
pub const UNKNOWN_KID_REFRESH_INTERVAL: Duration = Duration::from_secs(10);

/// Longest wait for the JWKS server (connect, headers and body).
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest a request naming an unknown `kid` waits for the refresh it caused (or found running); the
/// refresh itself goes on in the background. Bounds what a hanging JWKS server costs such requests.
const UNKNOWN_KID_WAIT: Duration = Duration::from_secs(1);

/// Largest JWK Set read; real ones are a few KiB.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// First retry after a failed load; doubles up to [`MAX_RETRY_DELAY`] (and never past the refresh period).
const FIRST_RETRY_DELAY: Duration = Duration::from_secs(1);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// One usable verification key.
pub struct Key {
    /// The public key.
    pub decoding: DecodingKey,
    /// The algorithms it may verify: its JWK `alg`, or every accepted one its type allows.
    pub algorithms: Vec<Algorithm>,
}

/// A loaded key set. `generation` changes whenever a refresh brings a different set, so anything
/// derived from an older set (the verifier's cache of verified tokens) knows to look again.
pub struct Keys {
    by_kid: HashMap<String, Key>,
    /// Distinguishes this set from the ones before it.
    pub generation: u64,
    fingerprint: u64,
}

impl Keys {
    /// The key with this id.
    pub fn get(&self, kid: &str) -> Option<&Key> {
        self.by_kid.get(kid)
    }
}

/// The cached key set and what keeps it fresh. Shared by every request.
pub struct KeySet {
    source: JwksSource,
    http: reqwest::Client,
    current: RwLock<Option<Arc<Keys>>>,
    /// The current set's generation plus one (0: none loaded), readable without the lock on every request.
    generation: AtomicU64,
    /// When a token with an unknown `kid` last caused a refresh.
    unknown_kid_refreshed: Mutex<Option<Instant>>,
    /// Held by whichever refresh runs, so they run one at a time and a slow one cannot overwrite the
    /// newer set of another.
    refreshing: tokio::sync::Mutex<()>,
    /// The last refresh's error, cleared by a success (for `/health`).
    last_error: RwLock<Option<String>>,
    refreshes: IntCounterVec,
    key_count: IntGauge,
}

impl KeySet {
    /// Starts loading the set in the background and refreshing it every `config.refresh`. The task
    /// ends when the last reference to the set is dropped.
    pub fn start(config: &JwtConfig, refreshes: IntCounterVec, key_count: IntGauge) -> anyhow::Result<Arc<Self>> {
        // No redirects, and an https URL is never answered over plain http: the keys come from exactly
        // the configured place (an open redirect there would otherwise let anyone supply them).
        let https = matches!(&config.jwks, JwksSource::Url(url) if url.starts_with("https://"));
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .https_only(https)
            .build()
            .context("could not build the JWKS HTTP client")?;
        let keys = Arc::new(Self {
            source: config.jwks.clone(),
            http,
            current: RwLock::new(None),
            generation: AtomicU64::new(0),
            unknown_kid_refreshed: Mutex::new(None),
            refreshing: tokio::sync::Mutex::new(()),
            last_error: RwLock::new(None),
            refreshes,
            key_count,
        });
        tokio::spawn(refresh_periodically(Arc::downgrade(&keys), config.refresh));
        Ok(keys)
    }

    /// The current set, if one was ever loaded.
    pub fn current(&self) -> Option<Arc<Keys>> {
        self.current.read().ok().and_then(|current| current.clone())
    }

    /// Whether a set has been loaded.
    pub fn is_loaded(&self) -> bool {
        self.generation().is_some()
    }

    /// The current set's generation, if one was loaded.
    pub fn generation(&self) -> Option<u64> {
        self.generation.load(Ordering::Acquire).checked_sub(1)
    }

    /// The last refresh's error, if it failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.read().ok().and_then(|error| error.clone())
    }

    /// Called for a token whose `kid` the current set lacks: starts a refresh unless one was started
    /// less than [`UNKNOWN_KID_REFRESH_INTERVAL`] ago, and waits for the refresh running (at most
    /// [`UNKNOWN_KID_WAIT`]), so the caller can look again.
    pub async fn refresh_for_unknown_kid(self: &Arc<Self>) {
        let start = match self.unknown_kid_refreshed.lock() {
            Ok(mut last) if last.is_none_or(|at| at.elapsed() >= UNKNOWN_KID_REFRESH_INTERVAL) => {
                *last = Some(Instant::now());
                true
            }
            _ => false,
        };
        if start {
            let set = Arc::clone(self);
            let refresh = tokio::spawn(async move { set.refresh("unknown_kid").await });
            let _ = tokio::time::timeout(UNKNOWN_KID_WAIT, refresh).await;
        } else {
            let _ = tokio::time::timeout(UNKNOWN_KID_WAIT, self.refreshing.lock()).await;
        }
    }

    /// Loads the set once, after any refresh already running; on failure the previous set stays.
    async fn refresh(&self, trigger: &str) -> anyhow::Result<()> {
        let _one_at_a_time = self.refreshing.lock().await;
        let result = self.load().await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.refreshes.with_label_values(&[trigger, outcome]).inc();
        match result {
            Ok((loaded, fingerprint)) => {
                let count = loaded.len();
                let mut current = self.current.write().map_err(|_| anyhow::anyhow!("key set lock poisoned"))?;
                if current.as_ref().is_none_or(|keys| keys.fingerprint != fingerprint) {
                    let generation = current.as_ref().map_or(0, |keys| keys.generation + 1);
                    tracing::info!(keys = count, generation, "loaded the issuer's key set");
                    *current = Some(Arc::new(Keys { by_kid: loaded, generation, fingerprint }));
                    self.generation.store(generation + 1, Ordering::Release);
                }
                self.key_count.set(i64::try_from(count).unwrap_or(i64::MAX));
                if let Ok(mut error) = self.last_error.write() {
                    *error = None;
                }
                Ok(())
            }
            Err(err) => {
                let kept = if self.is_loaded() { "keeping the last good set" } else { "no key set yet: not ready" };
                tracing::warn!(error = format!("{err:#}"), trigger, "could not refresh the issuer's key set; {kept}");
                if let Ok(mut error) = self.last_error.write() {
                    *error = Some(format!("{err:#}"));
                }
                Err(err)
            }
        }
    }

    /// The usable keys and the document's fingerprint.
    async fn load(&self) -> anyhow::Result<(HashMap<String, Key>, u64)> {
        let body = match &self.source {
            JwksSource::Url(url) => self.fetch(url).await.with_context(|| format!("JWKS {url}"))?,
            JwksSource::File(path) => {
                tokio::fs::read(path).await.with_context(|| format!("could not read JWKS file {}", path.display()))?
            }
        };
        if body.len() > MAX_JWKS_BYTES {
            bail!("the JWK Set is larger than {MAX_JWKS_BYTES} bytes");
        }
        Ok((parse(&body)?, fingerprint(&body)))
    }

    async fn fetch(&self, url: &str) -> anyhow::Result<Vec<u8>> {
        let mut response = self.http.get(url).send().await?.error_for_status()?;
        if !response.status().is_success() {
            bail!("answered {} (redirects are not followed)", response.status());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_JWKS_BYTES {
                bail!("the JWK Set is larger than {MAX_JWKS_BYTES} bytes");
            }
        }
        Ok(body)
    }
}

async fn refresh_periodically(keys: Weak<KeySet>, period: Duration) {
    let mut retry = Backoff::new(FIRST_RETRY_DELAY, MAX_RETRY_DELAY.min(period));
    loop {
        let Some(set) = keys.upgrade() else { return };
        let next = match set.refresh("schedule").await {
            Ok(()) => {
                retry.reset();
                period
            }
            Err(_) => retry.next_delay(),
        };
        drop(set);
        tokio::time::sleep(next).await;
    }
}

/// The usable keys of a JWK Set document. Keys that cannot be used are skipped (and logged); a set
/// with none left is an error, so a broken document never replaces a working one.
pub fn parse(document: &[u8]) -> anyhow::Result<HashMap<String, Key>> {
    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    let document: Document = serde_json::from_slice(document).context("not a JWK Set (JSON with a `keys` array)")?;
    let mut keys = HashMap::new();
    for raw in document.keys {
        let kid = raw.get("kid").and_then(|kid| kid.as_str()).unwrap_or("").to_owned();
        match usable_key(raw) {
            Ok(key) if !kid.is_empty() => {
                keys.insert(kid, key);
            }
            Ok(_) => tracing::debug!("skipping a JWK without a kid"),
            Err(reason) => tracing::debug!(kid, reason, "skipping a JWK"),
        }
    }
    if keys.is_empty() {
        bail!("the JWK Set has no usable signing key (RS256, PS256, ES256 or EdDSA, with a kid)");
    }
    Ok(keys)
}

fn usable_key(raw: serde_json::Value) -> Result<Key, &'static str> {
    let jwk: Jwk = serde_json::from_value(raw).map_err(|_| "not a JWK this api understands")?;
    if matches!(&jwk.common.public_key_use, Some(usage) if *usage != PublicKeyUse::Signature) {
        return Err("not a signing key (use)");
    }
    let by_type: &[Algorithm] = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => &[Algorithm::RS256, Algorithm::PS256],
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => &[Algorithm::ES256],
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => &[Algorithm::EdDSA],
        _ => return Err("key type not accepted (only RSA, EC P-256 and Ed25519)"),
    };
    let algorithms = match jwk.common.key_algorithm {
        None => by_type.to_vec(),
        Some(declared) => {
            let declared = accepted(declared).ok_or("its alg is not accepted")?;
            if !by_type.contains(&declared) {
                return Err("its alg does not fit its key type");
            }
            vec![declared]
        }
    };
    let decoding = DecodingKey::from_jwk(&jwk).map_err(|_| "its key parameters are invalid")?;
    Ok(Key { decoding, algorithms })
}

fn accepted(declared: KeyAlgorithm) -> Option<Algorithm> {
    Algorithm::from_str(&declared.to_string()).ok().filter(|algorithm| ACCEPTED_ALGORITHMS.contains(algorithm))
}

/// What identifies a document, so that a refresh bringing the same one changes nothing.
fn fingerprint(document: &[u8]) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    document.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RSA_N: &str = "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw";

    #[test]
    fn usable_keys_are_kept_and_the_rest_skipped() {
        let document = serde_json::json!({"keys": [
            {"kty": "RSA", "kid": "rsa", "n": RSA_N, "e": "AQAB"},
            {"kty": "RSA", "kid": "pss", "alg": "PS256", "use": "sig", "n": RSA_N, "e": "AQAB"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": RSA_N, "e": "AQAB"},
            {"kty": "RSA", "kid": "rs512", "alg": "RS512", "n": RSA_N, "e": "AQAB"},
            {"kty": "RSA", "kid": "mismatch", "alg": "ES256", "n": RSA_N, "e": "AQAB"},
            {"kty": "RSA", "n": RSA_N, "e": "AQAB"},
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "EC", "kid": "p384", "crv": "P-384", "x": "AA", "y": "AA"},
            {"kty": "nonsense", "kid": "x"},
        ]});
        let keys = parse(document.to_string().as_bytes()).unwrap();
        let mut kids: Vec<_> = keys.keys().cloned().collect();
        kids.sort();
        assert_eq!(kids, ["pss", "rsa"]);
        assert_eq!(keys["rsa"].algorithms, [Algorithm::RS256, Algorithm::PS256]);
        assert_eq!(keys["pss"].algorithms, [Algorithm::PS256]);
    }

    #[test]
    fn garbage_and_sets_without_usable_keys_are_errors() {
        for document in [
            &b"<html>"[..],
            b"{}",
            b"{\"keys\": []}",
            b"{\"keys\": [{\"kty\": \"oct\", \"kid\": \"h\", \"k\": \"AA\"}]}",
        ] {
            assert!(parse(document).is_err(), "{}", String::from_utf8_lossy(document));
        }
    }
}
