//! Authentication at the edge: bearer JWTs ([`JwtAuth`], given to
//! [`Api::authenticate`](crate::Api::authenticate)).
//!
//! With it, every route of the mounted resources needs
//! `Authorization: Bearer <JWT>`; `/health`, `/metrics` and
//! `/openapi.json` stay open, and the admin endpoints keep their own
//! token. A token is accepted when:
//!
//! - its signature verifies: HS256 with a shared secret, or RS256/384/512,
//!   PS256/384/512, ES256/384 or EdDSA with a public key from a JWKS file,
//!   picked by the token's `kid` (the file is read again when it changes,
//!   at most once a second, and at once for an unknown `kid`, so keys
//!   rotate without a restart); `alg: none` and algorithms the key does not
//!   name are refused;
//! - `exp` is in the future and `nbf` (when present) in the past, give or
//!   take the leeway (60 s by default);
//! - `iss` and `aud` are the configured ones, when configured;
//! - the subject claim (`sub` by default) is a non-empty string.
//!
//! A change feed (`GET …/changes`) may carry its token as the query
//! parameter `access_token` instead (RFC 6750 §2.3), as a browser's
//! `EventSource` cannot send headers; mind that proxies may log URLs.
//!
//! The principal recorded with every event is then the token's subject;
//! its roles come from the roles claim (`roles` by default: an array of
//! strings, or a space-separated string such as `scope`). A request without
//! a valid token is answered `401` with `WWW-Authenticate: Bearer
//! realm="kes"` (plus `error="invalid_token"` when a token was sent), and
//! never with the reason, which is logged at debug level.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use http::HeaderMap;
use http::header::AUTHORIZATION;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use crate::error::{ConfigError, HttpError};

/// The realm of the API's `WWW-Authenticate` challenge.
pub(crate) const REALM: &str = "kes";

/// Longest bearer token accepted, in bytes.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// How often a JWKS file is checked for changes at most.
const JWKS_RECHECK: Duration = Duration::from_secs(1);

/// Who a request comes from, once its token verified; in the request's
/// extensions for handlers and middleware after authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's subject: recorded as the principal of every event.
    pub subject: String,
    /// The roles (or scopes) the token grants.
    pub roles: Vec<String>,
}

impl Principal {
    /// Whether the token grants `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

/// Why a token was refused (logged, never sent).
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("no bearer token")]
    Missing,
    #[error("the token is longer than {MAX_TOKEN_BYTES} bytes")]
    TooLong,
    #[error("the token's header cannot be read: {0}")]
    Header(jsonwebtoken::errors::Error),
    #[error("no key with kid {0:?}")]
    UnknownKey(Option<String>),
    #[error("the key {kid:?} does not sign with {alg:?}")]
    WrongAlgorithm { kid: Option<String>, alg: Algorithm },
    #[error("{0}")]
    Invalid(jsonwebtoken::errors::Error),
    #[error("the token has no {0} claim (a non-empty string)")]
    NoSubject(String),
    #[error("the JWKS file cannot be read: {0}")]
    Jwks(String),
}

/// The `access_token` query parameter, when there is one.
fn query_token(query: Option<&str>) -> Option<String> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query?).ok()?;
    pairs.into_iter().find(|(k, _)| k == "access_token").map(|(_, v)| v)
}

/// Where verification keys come from.
enum Keys {
    Secret(DecodingKey),
    Jwks(JwksFile),
}

/// A JWKS file, read again when it changes.
struct JwksFile {
    path: PathBuf,
    loaded: RwLock<Vec<VerifyingKey>>,
    /// When the file was last looked at, and its modification time then.
    checked: Mutex<(Instant, Option<SystemTime>)>,
}

/// One key of a JWKS file.
struct VerifyingKey {
    kid: Option<String>,
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

/// Bearer JWT authentication; see the [module docs](self).
pub struct JwtAuth {
    keys: Keys,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: Duration,
    subject_claim: String,
    roles_claim: String,
}

impl std::fmt::Debug for JwtAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = match &self.keys {
            Keys::Secret(_) => "HS256 secret".to_owned(),
            Keys::Jwks(j) => format!("JWKS {}", j.path.display()),
        };
        f.debug_struct("JwtAuth")
            .field("keys", &keys)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway", &self.leeway)
            .field("subject_claim", &self.subject_claim)
            .field("roles_claim", &self.roles_claim)
            .finish()
    }
}

impl JwtAuth {
    /// Fewest bytes an HS256 secret may have.
    pub const MIN_SECRET_BYTES: usize = 32;

    /// Tokens signed with HS256 and `secret` (at least
    /// [`JwtAuth::MIN_SECRET_BYTES`] bytes).
    pub fn hs256(secret: &[u8]) -> Result<Self, ConfigError> {
        if secret.len() < Self::MIN_SECRET_BYTES {
            return Err(ConfigError(format!("an HS256 secret needs at least {} bytes", Self::MIN_SECRET_BYTES)));
        }
        Ok(Self::with_keys(Keys::Secret(DecodingKey::from_secret(secret))))
    }

    /// Tokens signed with a key of the JWKS file at `path` (RSA, EC P-256
    /// or P-384, Ed25519), chosen by the token's `kid`. The file is read
    /// now (an unreadable or empty one is a configuration error) and again
    /// whenever it changes.
    pub fn jwks_file(path: impl Into<PathBuf>) -> Result<Self, ConfigError> {
        let path = path.into();
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        let keys = read_jwks(&path).map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        if keys.is_empty() {
            return Err(ConfigError(format!("{}: no usable verification key", path.display())));
        }
        Ok(Self::with_keys(Keys::Jwks(JwksFile {
            path,
            loaded: RwLock::new(keys),
            checked: Mutex::new((Instant::now(), modified)),
        })))
    }

    fn with_keys(keys: Keys) -> Self {
        Self {
            keys,
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(60),
            subject_claim: "sub".into(),
            roles_claim: "roles".into(),
        }
    }

    /// Accepts only tokens whose `iss` is `issuer`.
    pub fn issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuer = Some(issuer.into());
        self
    }

    /// Accepts only tokens whose `aud` names `audience`.
    pub fn audience(mut self, audience: impl Into<String>) -> Self {
        self.audience = Some(audience.into());
        self
    }

    /// How far `exp` and `nbf` may be off (clock skew); 60 s by default.
    pub fn leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway;
        self
    }

    /// The claim that names the principal; `sub` by default.
    pub fn subject_claim(mut self, claim: impl Into<String>) -> Self {
        self.subject_claim = claim.into();
        self
    }

    /// The claim that lists the roles; `roles` by default.
    pub fn roles_claim(mut self, claim: impl Into<String>) -> Self {
        self.roles_claim = claim.into();
        self
    }

    /// The principal of `request`, or the `401` to answer. A change feed
    /// (`GET …/changes`) without an `Authorization` header may carry its
    /// token as the query parameter `access_token` (RFC 6750 §2.3), since
    /// a browser's `EventSource` cannot send headers.
    pub(crate) fn authenticate_request<B>(&self, request: &http::Request<B>) -> Result<Principal, HttpError> {
        let feed = request.method() == http::Method::GET
            && request.uri().path().trim_end_matches('/').ends_with("/changes")
            && !request.headers().contains_key(AUTHORIZATION);
        if feed && let Some(token) = query_token(request.uri().query()) {
            return self.verify(&token).map_err(|why| {
                tracing::debug!(reason = %why, "access_token refused");
                HttpError::Unauthorized { realm: REALM, invalid_token: true }
            });
        }
        self.authenticate(request.headers())
    }

    /// The principal of a request with `headers`, or the `401` to answer.
    pub(crate) fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, HttpError> {
        let sent = headers.get(AUTHORIZATION).is_some();
        self.verify_headers(headers).map_err(|why| {
            tracing::debug!(reason = %why, "bearer token refused");
            HttpError::Unauthorized { realm: REALM, invalid_token: sent }
        })
    }

    fn verify_headers(&self, headers: &HeaderMap) -> Result<Principal, Refused> {
        let value = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()).ok_or(Refused::Missing)?;
        let (scheme, token) = value.split_once(' ').ok_or(Refused::Missing)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Refused::Missing);
        }
        self.verify(token.trim())
    }

    /// The principal `token` names, when it verifies.
    fn verify(&self, token: &str) -> Result<Principal, Refused> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Refused::TooLong);
        }
        let header = jsonwebtoken::decode_header(token).map_err(Refused::Header)?;
        let claims = match &self.keys {
            Keys::Secret(key) => self.decode(token, key, vec![Algorithm::HS256])?,
            Keys::Jwks(file) => {
                let kid = header.kid.clone();
                let decoded = file.with_key(kid.as_deref(), |k| {
                    if !k.algorithms.contains(&header.alg) {
                        return Err(Refused::WrongAlgorithm { kid: kid.clone(), alg: header.alg });
                    }
                    self.decode(token, &k.key, vec![header.alg])
                });
                match decoded {
                    Some(result) => result?,
                    None => {
                        // A key rotated in since the file was last read.
                        file.reload(true)?;
                        file.with_key(kid.as_deref(), |k| {
                            if !k.algorithms.contains(&header.alg) {
                                return Err(Refused::WrongAlgorithm { kid: kid.clone(), alg: header.alg });
                            }
                            self.decode(token, &k.key, vec![header.alg])
                        })
                        .ok_or(Refused::UnknownKey(kid))??
                    }
                }
            }
        };
        let subject = claims
            .get(&self.subject_claim)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty() && s.len() <= 256)
            .ok_or_else(|| Refused::NoSubject(self.subject_claim.clone()))?
            .to_owned();
        let roles = match claims.get(&self.roles_claim) {
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
            Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
            _ => Vec::new(),
        };
        Ok(Principal { subject, roles })
    }

    fn decode(&self, token: &str, key: &DecodingKey, algorithms: Vec<Algorithm>) -> Result<Value, Refused> {
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms;
        validation.leeway = self.leeway.as_secs();
        validation.validate_nbf = true;
        validation.validate_exp = true;
        validation.required_spec_claims = HashSet::from(["exp".to_owned()]);
        match &self.issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &self.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        jsonwebtoken::decode::<Value>(token, key, &validation).map(|t| t.claims).map_err(Refused::Invalid)
    }

    /// Reads a changed JWKS file again (at most once a second); for tests
    /// and for callers that know the file changed.
    pub fn refresh(&self) -> Result<(), ConfigError> {
        match &self.keys {
            Keys::Jwks(file) => file.reload(true).map_err(|e| ConfigError(e.to_string())),
            Keys::Secret(_) => Ok(()),
        }
    }
}

impl JwksFile {
    /// Runs `f` on the key `kid` names (or the only key, for a token
    /// without `kid`), after reading the file again if it changed; `None`
    /// when there is no such key.
    fn with_key<T>(&self, kid: Option<&str>, f: impl FnOnce(&VerifyingKey) -> T) -> Option<T> {
        if let Err(e) = self.reload(false) {
            tracing::warn!(file = %self.path.display(), error = %e, "JWKS file unreadable; keeping the keys read before");
        }
        let keys = self.loaded.read().unwrap_or_else(|p| p.into_inner());
        let key = match kid {
            Some(kid) => keys.iter().find(|k| k.kid.as_deref() == Some(kid)),
            None if keys.len() == 1 => keys.first(),
            None => None,
        }?;
        Some(f(key))
    }

    /// Reads the file again when it changed since it was last read; checks
    /// at most once a second unless `now` (an unknown `kid`: checks once
    /// more even within the second, at most every 100 ms).
    fn reload(&self, now: bool) -> Result<(), Refused> {
        {
            let mut checked = self.checked.lock().unwrap_or_else(|p| p.into_inner());
            let wait = if now { Duration::from_millis(100) } else { JWKS_RECHECK };
            if checked.0.elapsed() < wait {
                return Ok(());
            }
            let modified = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
            checked.0 = Instant::now();
            if modified == checked.1 {
                return Ok(());
            }
            checked.1 = modified;
        }
        let keys = read_jwks(&self.path).map_err(Refused::Jwks)?;
        tracing::info!(file = %self.path.display(), keys = keys.len(), "JWKS file read again");
        *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = keys;
        Ok(())
    }
}

/// The verification keys of the JWKS file at `path`; keys of kinds KES
/// does not verify with (shared secrets, unknown curves) are left out.
fn read_jwks(path: &Path) -> Result<Vec<VerifyingKey>, String> {
    let text = std::fs::read(path).map_err(|e| e.to_string())?;
    let set: JwkSet = serde_json::from_slice(&text).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let Some(algorithms) = algorithms_of(jwk) else {
            tracing::warn!(file = %path.display(), kid = ?jwk.common.key_id, "a JWKS key KES cannot verify with is left out");
            continue;
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {:?}: {e}", jwk.common.key_id))?;
        keys.push(VerifyingKey { kid: jwk.common.key_id.clone(), algorithms, key });
    }
    Ok(keys)
}

/// What a key verifies: the algorithm it names, or those of its kind.
fn algorithms_of(jwk: &Jwk) -> Option<Vec<Algorithm>> {
    let named = jwk.common.key_algorithm.and_then(|a| match a {
        KeyAlgorithm::RS256 => Some(Algorithm::RS256),
        KeyAlgorithm::RS384 => Some(Algorithm::RS384),
        KeyAlgorithm::RS512 => Some(Algorithm::RS512),
        KeyAlgorithm::PS256 => Some(Algorithm::PS256),
        KeyAlgorithm::PS384 => Some(Algorithm::PS384),
        KeyAlgorithm::PS512 => Some(Algorithm::PS512),
        KeyAlgorithm::ES256 => Some(Algorithm::ES256),
        KeyAlgorithm::ES384 => Some(Algorithm::ES384),
        KeyAlgorithm::EdDSA => Some(Algorithm::EdDSA),
        _ => None,
    });
    let of_kind = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => vec![Algorithm::EdDSA],
        // Shared secrets do not belong in a file of public keys.
        _ => return None,
    };
    match named {
        Some(alg) if of_kind.contains(&alg) => Some(vec![alg]),
        Some(_) => None,
        None => Some(of_kind),
    }
}
