//! API keys: one check for every front door.
//!
//! [`ApiKeys::verify`] takes the value of an `Authorization` header (`Bearer <key>`, the scheme
//! in any case) however the front door received it (an HTTP header, gRPC metadata) and says
//! whether it names a configured key. The comparison takes the same time whatever the key: the
//! presented key and every configured one are hashed (SHA-256) and the digests compared in
//! constant time with `subtle`, all of them, so neither the content nor the length of a key
//! leaks through timing. [`ApiKeys::is_open`] is the HTTP policy: every route needs a key but
//! the probes (`/live`, `/health`, `/v2/health/*`) and, unless `--protect-metrics`, `/metrics`;
//! a route added later is protected without anyone having to remember it.
//!
//! Keys come from `--api-key` (repeatable), `TCH_SERVE_API_KEY` (comma-separated) and
//! `--api-key-file` (one per line); [`ApiKey`] never shows its value in `Debug` or in the
//! configuration logged at start-up.

use std::fmt;

use serde::{Serialize, Serializer};
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

/// One API key as configured. Its value is never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// For clap: any string is taken here, and checked by [`ApiKeys::new`], whose message does
    /// not repeat it (clap's own error would).
    pub fn from_arg(s: &str) -> Result<Self, std::convert::Infallible> {
        Ok(Self(s.to_owned()))
    }

    fn check(&self) -> Result<(), &'static str> {
        if self.0.is_empty() {
            return Err("an API key is empty");
        }
        if !self.0.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("an API key holds a space, a control or a non-ASCII character");
        }
        Ok(())
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// How the configuration shows the keys: their number, never their values.
pub fn redact_keys<S: Serializer>(keys: &[ApiKey], s: S) -> Result<S::Ok, S::Error> {
    match keys.len() {
        0 => s.serialize_none(),
        1 => "1 key (redacted)".serialize(s),
        n => format!("{n} keys (redacted)").serialize(s),
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization: Bearer <key>` at all.
    Missing,
    /// A bearer key that is not one of ours.
    Invalid,
}

/// The configured keys, as digests, and the policy of which HTTP routes need one.
#[derive(Default)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
    protect_metrics: bool,
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeys")
            .field("keys", &self.digests.len())
            .field("protect_metrics", &self.protect_metrics)
            .finish()
    }
}

fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

impl ApiKeys {
    /// The keys of `--api-key`/`TCH_SERVE_API_KEY` and of `--api-key-file`, if given. An error
    /// names where the bad key came from (never the key itself).
    pub fn new(
        keys: &[ApiKey],
        file: Option<&std::path::Path>,
        protect_metrics: bool,
    ) -> Result<Self, String> {
        let mut all = Vec::new();
        for key in keys {
            key.check()
                .map_err(|why| format!("{why} (--api-key / TCH_SERVE_API_KEY)"))?;
            all.push(digest(key.0.as_bytes()));
        }
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                format!(
                    "cannot read --api-key-file {} ({e}); the server runs as uid {}, which must be able to read it",
                    path.display(),
                    // SAFETY: getuid has no preconditions and cannot fail.
                    unsafe { libc::getuid() }
                )
            })?;
            let mut from_file = 0;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                ApiKey(line.to_owned()).check().map_err(|why| {
                    format!("{why} (--api-key-file {}, line {})", path.display(), n + 1)
                })?;
                all.push(digest(line.as_bytes()));
                from_file += 1;
            }
            if from_file == 0 {
                tracing::warn!(
                    file = %path.display(),
                    "--api-key-file holds no key (only blank lines and comments)"
                );
            }
        }
        Ok(Self {
            digests: all,
            protect_metrics,
        })
    }

    /// Whether any key is configured (if not, nothing is checked).
    pub fn enabled(&self) -> bool {
        !self.digests.is_empty()
    }

    /// Keys configured.
    pub fn len(&self) -> usize {
        self.digests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether an HTTP request for `path` is served without a key: the probes, and the metrics
    /// unless `--protect-metrics`. Everything else needs one (when keys are configured).
    pub fn is_open(&self, path: &str) -> bool {
        matches!(path, "/live" | "/health")
            || path.starts_with("/v2/health/")
            || (path == "/metrics" && !self.protect_metrics)
    }

    /// Checks an `Authorization` value: `Bearer <key>`, the scheme in any case, one or more
    /// spaces, then one of the keys. Ok when no key is configured.
    pub fn verify(&self, authorization: Option<&[u8]>) -> Result<(), Refusal> {
        if !self.enabled() {
            return Ok(());
        }
        let token = authorization
            .and_then(bearer_token)
            .ok_or(Refusal::Missing)?;
        let presented = digest(token);
        // Every key is compared, whichever matches: the time does not depend on which.
        let matched = self
            .digests
            .iter()
            .fold(Choice::from(0), |acc, d| acc | d.ct_eq(&presented));
        if bool::from(matched) {
            Ok(())
        } else {
            Err(Refusal::Invalid)
        }
    }
}

/// What follows `Bearer ` (RFC 6750, section 2.1), or None for another scheme or nothing. (A
/// token with a space in it is returned, and matches no key: keys have none.)
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let (scheme, rest) = value.split_at(value.iter().position(|&b| b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii_start();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(list: &[&str]) -> ApiKeys {
        let list: Vec<ApiKey> = list.iter().map(|k| ApiKey(k.to_string())).collect();
        ApiKeys::new(&list, None, false).unwrap()
    }

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"bearer   abc "), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"Bearer a b"), Some(&b"a b"[..]));
        for bad in [
            &b"Bearer"[..],
            b"Bearer ",
            b"Bearerabc",
            b"Basic abc",
            b"abc",
            b"",
        ] {
            assert_eq!(
                bearer_token(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn verify_takes_any_configured_key() {
        let k = keys(&["one-key", "another-key"]);
        assert_eq!(k.verify(Some(b"Bearer one-key")), Ok(()));
        assert_eq!(k.verify(Some(b"BEARER another-key")), Ok(()));
        assert_eq!(k.verify(Some(b"Bearer one-ke")), Err(Refusal::Invalid));
        assert_eq!(k.verify(Some(b"Bearer one-keyy")), Err(Refusal::Invalid));
        assert_eq!(
            k.verify(Some(b"Bearer one-key another-key")),
            Err(Refusal::Invalid)
        );
        assert_eq!(k.verify(Some(b"Basic one-key")), Err(Refusal::Missing));
        assert_eq!(k.verify(None), Err(Refusal::Missing));
        assert_eq!(keys(&[]).verify(None), Ok(()));
    }

    #[test]
    fn only_probes_are_open() {
        let k = keys(&["k"]);
        for open in [
            "/live",
            "/health",
            "/metrics",
            "/v2/health/live",
            "/v2/health/ready",
        ] {
            assert!(k.is_open(open), "{open}");
        }
        for closed in [
            "/predict",
            "/models",
            "/health/",
            "/Health",
            "/v2",
            "/v2/health",
            "/v2/models/x/infer",
            "/openapi.json",
            "/metrics/",
        ] {
            assert!(!k.is_open(closed), "{closed}");
        }
        let protected = ApiKeys::new(&[ApiKey("k".into())], None, true).unwrap();
        assert!(!protected.is_open("/metrics"));
    }

    #[test]
    fn bad_keys_are_refused_without_showing_them() {
        for bad in ["", "two words", "tab\tkey", "caf\u{e9}"] {
            let err = ApiKeys::new(&[ApiKey(bad.into())], None, false).unwrap_err();
            assert!(err.contains("--api-key"), "{err}");
            if !bad.is_empty() {
                assert!(!err.contains(bad), "{err}");
            }
        }
        assert_eq!(
            format!("{:?}", ApiKey("secret".into())),
            "ApiKey(<redacted>)"
        );
    }
}
