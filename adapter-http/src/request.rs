//! Reading requests and writing answers: ETags, preconditions, position
//! tokens, ids and retry keys, bodies, history paging.

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use kes_core::{ExpectedVersion, Metadata, Position};
use serde_json::{Map, Value};

use crate::access::ANONYMOUS;
use crate::api::{MAX_TOKEN, Shared, names};
use crate::auth::Principal;
use crate::error::HttpError;
use crate::resource::Operation;

pub(crate) fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(bytes) => {
            let mut r = (status, bytes).into_response();
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        Err(e) => HttpError::Internal(format!("cannot serialise the answer: {e}")).into_response(),
    }
}

/// An answer whose body is JSON already serialised.
pub(crate) fn json_bytes(status: StatusCode, body: Bytes) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// `"VERSION"`: written by hand, as this runs on every read by id.
pub(crate) fn etag(version: u64) -> HeaderValue {
    // 20 digits at most, between two quotes.
    let mut text = [b'"'; 22];
    let mut at = 21;
    let mut rest = version;
    loop {
        at -= 1;
        text[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    // Digits between quotes are always a valid header value.
    HeaderValue::from_bytes(&text[at - 1..]).unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
}

/// The text of header `name` (one of [`names`]), trimmed.
pub(crate) fn header_text<'a>(headers: &'a HeaderMap, name: &'static HeaderName) -> Result<Option<&'a str>, HttpError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim()))
            .map_err(|_| HttpError::InvalidHeader { name: name.as_str(), reason: "not visible ASCII".into() }),
    }
}

/// `If-Match` → the expected version: `"3"` (or `3`) → exactly 3, `*` → it
/// must exist. One tag only: a version is a single point. Exactly what
/// the OpenAPI document's pattern admits (`kes.IfMatch`).
pub(crate) fn if_match(headers: &HeaderMap) -> Result<Option<ExpectedVersion>, HttpError> {
    let Some(text) = header_text(headers, &names::IF_MATCH)? else { return Ok(None) };
    if text == "*" {
        return Ok(Some(ExpectedVersion::Exists));
    }
    let bad = || HttpError::InvalidHeader {
        name: "if-match",
        reason: "expected * or one entity tag holding a version, like \"3\"".into(),
    };
    let tag = match text.strip_prefix('"') {
        Some(quoted) => quoted.strip_suffix('"').ok_or_else(bad)?,
        None => text,
    };
    version_digits(tag).map(|v| Some(ExpectedVersion::Exact(v))).ok_or_else(bad)
}

/// A version written as the document says: 1 to 19 digits, no leading zero.
pub(crate) fn version_digits(text: &str) -> Option<u64> {
    let plain = (1..=19).contains(&text.len()) && !text.starts_with('0') && text.bytes().all(|b| b.is_ascii_digit());
    if plain { text.parse().ok() } else { None }
}

/// Whether `If-None-Match` names `version` (weak comparison, as RFC 9110 asks).
pub(crate) fn none_match(headers: &HeaderMap, version: u64) -> Result<bool, HttpError> {
    let Some(text) = header_text(headers, &names::IF_NONE_MATCH)? else { return Ok(false) };
    Ok(text.split(',').map(str::trim).any(|tag| {
        tag == "*" || {
            let tag = tag.strip_prefix("W/").unwrap_or(tag);
            tag.strip_prefix('"').and_then(|t| t.strip_suffix('"')).unwrap_or(tag).parse::<u64>() == Ok(version)
        }
    }))
}

/// The `KES-Position` token of a write to `log` (the aggregate type) at
/// `position`: `LOG@PARTITION:OFFSET`. Every aggregate type has a log of its
/// own (its SQL table is partition 0 of it; on Kafka, its events topic), so
/// a token names the log its position belongs to.
pub(crate) fn position_text(log: &str, position: Position) -> String {
    format!("{log}@{position}")
}

/// A `KES-Position` token of a read on the resource whose log is `log`:
/// `None` without one, `Some(None)` for a token of another log (another
/// aggregate type: nothing here can wait for it), `Some(Some(position))`
/// for one of `log` (or a bare `PARTITION:OFFSET`, taken to be of `log`).
pub(crate) fn position_token(headers: &HeaderMap, log: &str) -> Result<Option<Option<Position>>, HttpError> {
    let text = match header_text(headers, &names::POSITION)? {
        None | Some("") => return Ok(None),
        Some(text) => text,
    };
    let bad = || HttpError::InvalidHeader {
        name: names::POSITION.as_str(),
        reason: "expected LOG@PARTITION:OFFSET (a log name of letters, digits, _ . -; at most 9 and 19 digits)".into(),
    };
    let (named, position) = match text.split_once('@') {
        Some((named, position)) => (Some(named), position),
        None => (None, text),
    };
    if let Some(named) = named
        && !((1..=64).contains(&named.len())
            && named.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')))
    {
        return Err(bad());
    }
    // The document's pattern bounds the digits so that every token it
    // admits fits: 9 for the partition, 19 for the offset.
    let fits = position.split_once(':').is_some_and(|(p, o)| p.len() <= 9 && o.len() <= 19);
    let position = position.parse::<Position>().ok().filter(|_| fits).ok_or_else(bad)?;
    Ok(Some(match named {
        Some(named) if named != log => None,
        _ => Some(position),
    }))
}

/// An id as the document's `kes.Id` pattern says (see [`crate::id`]).
pub(crate) fn check_id(id: &str) -> Result<(), HttpError> {
    if !crate::id::is_valid_id(id) {
        return Err(HttpError::BadRequest(crate::id::ID_RULE.to_owned()));
    }
    Ok(())
}

/// An `Idempotency-Key` as the document's `kes.IdempotencyKey` says: 1 to
/// 255 visible ASCII characters and inner spaces.
pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, HttpError> {
    let Some(key) = header_text(headers, &names::IDEMPOTENCY_KEY)? else { return Ok(None) };
    if key.is_empty() || key.len() > MAX_TOKEN || !key.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(HttpError::InvalidHeader {
            name: names::IDEMPOTENCY_KEY.as_str(),
            reason: format!("a key is 1 to {MAX_TOKEN} visible ASCII characters (inner spaces allowed)"),
        });
    }
    Ok(Some(key.to_owned()))
}

pub(crate) fn bounded_token(headers: &HeaderMap, name: &'static HeaderName) -> Result<Option<String>, HttpError> {
    match header_text(headers, name)? {
        None | Some("") => Ok(None),
        Some(t) if t.len() > MAX_TOKEN => {
            Err(HttpError::InvalidHeader { name: name.as_str(), reason: format!("longer than {MAX_TOKEN} bytes") })
        }
        Some(t) => Ok(Some(t.to_owned())),
    }
}

/// What separates a retry key from its caller in what is hashed: never in
/// a key (visible ASCII), so the client's part is unambiguous.
const KEY_SCOPE: &str = "\u{b7}";

/// What a stored retry key starts with: the digest's name.
const STORED_KEY_PREFIX: &str = "sha256:";

/// A retry key as the store keeps it: `sha256:` and the unpadded base64url
/// SHA-256 of the key the client sent (for an identified caller, of the
/// key, `·` and the caller's subject).
///
/// The caller's part makes a retry the same caller sending the same key:
/// another caller who sends that key (guessed, or its own by chance) runs
/// its command, and meets the resource's rules, instead of being answered
/// with the first caller's write. The digest keeps the key itself out of
/// the log, the table and the views, where it would stay readable forever:
/// clients put order numbers, dates and names in their keys. A store
/// compares stored keys only for equality, so it needs no more.
pub(crate) fn stored_key(key: &str, caller: Option<&Principal>) -> String {
    use base64::Engine;
    use sha2::{Digest, Sha256};
    let mut digest = Sha256::new();
    digest.update(key.as_bytes());
    if let Some(caller) = caller.filter(|c| c.subject != ANONYMOUS) {
        digest.update(KEY_SCOPE.as_bytes());
        digest.update(caller.subject.as_bytes());
    }
    let mut stored = String::with_capacity(STORED_KEY_PREFIX.len() + 43);
    stored.push_str(STORED_KEY_PREFIX);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(digest.finalize(), &mut stored);
    stored
}

/// Who asked (`caller`, from [`Shared::caller`]), as part of what, under
/// which retry key (`key`, the request's [`idempotency_key`], stored
/// hashed with the caller: see [`stored_key`]).
pub(crate) fn metadata(parts: &Parts, caller: Option<&Principal>, key: Option<&str>) -> Result<Metadata, HttpError> {
    let request_id = bounded_token(&parts.headers, &names::REQUEST_ID).ok().flatten();
    let correlation_id = bounded_token(&parts.headers, &names::CORRELATION)?.or_else(|| request_id.clone());
    let mut extra = std::collections::BTreeMap::new();
    if let Some(r) = request_id {
        extra.insert("request_id".to_owned(), r);
    }
    Ok(Metadata {
        correlation_id,
        causation_id: None,
        principal: Some(caller.map_or_else(|| ANONYMOUS.to_owned(), |c| c.subject.clone())),
        idempotency_key: key.map(|key| stored_key(key, caller)),
        extra,
    })
}

/// Reads the body: JSON, or a flat form turned into a JSON object; an
/// empty body is `{}`.
pub(crate) async fn read_body<C>(
    shared: &Shared,
    parts: &Parts,
    body: Body,
    op: &Operation<C>,
) -> Result<Value, HttpError> {
    let limit = shared.config.body_limit;
    let bytes: Bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        // The limit error sits somewhere in the chain (axum and tower-http both wrap it).
        let too_large = std::iter::successors(std::error::Error::source(&e), |s| s.source())
            .any(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            HttpError::PayloadTooLarge(limit)
        } else {
            HttpError::MalformedBody("the body could not be read".into())
        }
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Map::new()));
    }
    let media = match header_text(&parts.headers, &names::CONTENT_TYPE)? {
        None => "application/json".to_owned(),
        Some(t) => t.split(';').next().unwrap_or("").trim().to_ascii_lowercase(),
    };
    if media == "application/json" || (media.starts_with("application/") && media.ends_with("+json")) {
        return serde_json::from_slice(&bytes).map_err(|e| HttpError::MalformedBody(format!("not JSON: {e}")));
    }
    if media == "application/x-www-form-urlencoded" {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(&bytes)
            .map_err(|e| HttpError::MalformedBody(format!("not form data: {e}")))?;
        let mut fields = Map::new();
        for (k, v) in pairs {
            match fields.get_mut(&k) {
                // A repeated key is a list (`tag=a&tag=b`).
                Some(Value::Array(items)) => items.push(v.into()),
                Some(first) => *first = Value::Array(vec![first.take(), v.into()]),
                None => {
                    fields.insert(k, v.into());
                }
            }
        }
        return Ok(op.coerce_form(fields));
    }
    Err(HttpError::UnsupportedMediaType(media.chars().take(64).collect()))
}

/// Rows of history per page when the client names no `page[size]`.
pub const HISTORY_DEFAULT_PAGE: u32 = 1_000;

/// `page[after]` (a version, default 0) and `page[size]` (1 to
/// [`kes_core::HISTORY_MAX_PAGE`]) of a history request; any
/// other parameter is refused.
pub(crate) fn history_paging(query: Option<&str>) -> Result<(u64, u32), HttpError> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(query.unwrap_or("")).map_err(|e| HttpError::MalformedQuery(e.to_string()))?;
    let (mut after, mut size) = (0u64, HISTORY_DEFAULT_PAGE);
    let max = kes_core::HISTORY_MAX_PAGE;
    for (key, value) in pairs {
        match key.as_str() {
            "page[after]" => {
                after = value.parse().map_err(|_| {
                    HttpError::MalformedQuery(format!("page[after] must be a version (a whole number), not {value:?}"))
                })?;
            }
            "page[size]" => {
                size = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=max).contains(n))
                    .ok_or_else(|| HttpError::MalformedQuery(format!("page[size] must be 1 to {max}")))?;
            }
            other => {
                return Err(HttpError::MalformedQuery(format!(
                    "unknown parameter {other:?}: history takes page[size] and page[after]"
                )));
            }
        }
    }
    Ok((after, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_are_quoted_versions() {
        for version in [0, 1, 9, 10, 4_096, 99_999, u64::MAX] {
            assert_eq!(etag(version).to_str().expect("ASCII"), format!("\"{version}\""));
        }
    }
}
