//! `dev-token [SCOPES] [--ttl SECONDS] [--count N]`: prints an access token (or N different ones, one a
//! line, for `bench/run`) for the local stack (`scripts/up`, docker-compose), signed with the committed
//! development key `dev/auth/dev-only-signing-key.pem`.
//! `dev-token --jwks` prints the JWK Set of that key (what `dev/auth/jwks.json` holds).
//!
//! That key is public (it is in this repository): only a stack configured with
//! `AUTH_ISSUER=highload-microservice-dev` trusts its tokens, and no deployment manifest does.

#![expect(clippy::print_stdout, reason = "printing the token is this tool's job")]

use std::process::ExitCode;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

/// `AUTH_ISSUER` of the local stack.
const DEV_ISSUER: &str = "highload-microservice-dev";
/// `AUTH_AUDIENCE` of the local stack.
const DEV_AUDIENCE: &str = "highload-microservice";
const DEV_KID: &str = "dev-1";
const DEV_CLIENT: &str = "dev-client";

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(output) => {
            println!("{output}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("dev-token: {message}\nusage: dev-token [SCOPES] [--ttl SECONDS] [--count N] | dev-token --jwks");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Vec<String>) -> Result<String, String> {
    let pem = include_bytes!("../../../dev/auth/dev-only-signing-key.pem");
    let key = EncodingKey::from_ec_pem(pem).map_err(|err| format!("the development key is unusable: {err}"))?;
    let mut scopes = testkit::auth::ALL_SCOPES.to_owned();
    let mut ttl: u64 = 12 * 3600;
    let mut count: u32 = 1;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--jwks" => {
                let mut jwk = serde_json::to_value(
                    jsonwebtoken::jwk::Jwk::from_encoding_key(&key, Algorithm::ES256).map_err(|err| err.to_string())?,
                )
                .map_err(|err| err.to_string())?;
                jwk["kid"] = json!(DEV_KID);
                jwk["use"] = json!("sig");
                return serde_json::to_string_pretty(&json!({"keys": [jwk]})).map_err(|err| err.to_string());
            }
            "--ttl" => {
                ttl = args.next().and_then(|value| value.parse().ok()).ok_or("--ttl needs a number of seconds")?;
            }
            "--count" => {
                count = args.next().and_then(|value| value.parse().ok()).ok_or("--count needs a number")?;
            }
            other if other.starts_with('-') => return Err(format!("unknown option {other}")),
            other => scopes = other.to_owned(),
        }
    }
    let now = testkit::auth::now();
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(DEV_KID.to_owned());
    let tokens = (0..count).map(|n| {
        // `jti` makes each of several tokens different (same client, so one rate-limit budget).
        let claims = json!({"iss": DEV_ISSUER, "aud": DEV_AUDIENCE, "client_id": DEV_CLIENT, "sub": DEV_CLIENT,
                            "scope": scopes, "iat": now, "nbf": now, "exp": now + ttl, "jti": n});
        jsonwebtoken::encode(&header, &claims, &key).map_err(|err| err.to_string())
    });
    Ok(tokens.collect::<Result<Vec<_>, _>>()?.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed JWK Set is the development key's, so the local stack accepts `dev-token`'s tokens.
    #[test]
    fn the_committed_jwks_is_the_development_keys() {
        let committed: serde_json::Value =
            serde_json::from_str(include_str!("../../../dev/auth/jwks.json")).expect("dev/auth/jwks.json is JSON");
        let printed: serde_json::Value = serde_json::from_str(&run(vec!["--jwks".into()]).unwrap()).unwrap();
        assert_eq!(
            committed, printed,
            "regenerate with: cargo run -q -p testkit --bin dev-token -- --jwks > dev/auth/jwks.json"
        );
    }

    #[test]
    fn tokens_carry_the_dev_issuer_and_the_scopes_asked_for() {
        let token = run(vec!["users:read".into(), "--ttl".into(), "60".into()]).unwrap();
        let claims: serde_json::Value = jsonwebtoken::dangerous::insecure_decode_claims(&token).unwrap();
        assert_eq!((claims["iss"].as_str(), claims["scope"].as_str()), (Some(DEV_ISSUER), Some("users:read")));
        assert_eq!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(), 60);
        assert!(run(vec!["--ttl".into()]).is_err());
        let many = run(vec!["--count".into(), "3".into()]).unwrap();
        let distinct: std::collections::HashSet<&str> = many.lines().collect();
        assert_eq!(distinct.len(), 3);
    }
}
