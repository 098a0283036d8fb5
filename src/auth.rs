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
//!
//! Rotation: [`ApiKeys::reload`] reads `--api-key-file` again ([`watch_key_file`] calls it
//! when the file changes, as a Kubernetes Secret's mounted file does, and on SIGHUP). Keys
//! added are valid at once; keys removed stay valid for `--api-key-rotation-grace-secs`, so
//! that clients move to the new key with no request refused. A file that cannot be read or
//! holds a bad key is refused and the keys in use are kept; so is one that would leave no key
//! at all (a reload never turns the checks off).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{Duration, Instant, SystemTime};

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
    /// From `--api-key` / `TCH_SERVE_API_KEY`: for the life of the process.
    fixed: Vec<[u8; 32]>,
    file: Option<PathBuf>,
    grace: Duration,
    from_file: RwLock<FileKeys>,
    /// Whether keys are checked: decided at start-up, never changed by a reload.
    enabled: bool,
    protect_metrics: bool,
}

/// The keys of `--api-key-file`: those it holds, and those it held until a recent change.
#[derive(Default)]
struct FileKeys {
    current: Vec<[u8; 32]>,
    /// Removed from the file; valid until the instant given.
    retiring: Vec<([u8; 32], Instant)>,
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeys")
            .field("keys", &self.len())
            .field("protect_metrics", &self.protect_metrics)
            .finish()
    }
}

fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

/// The digests of the keys in `path`; an error names the file and line (never the key).
fn read_key_file(path: &Path) -> Result<Vec<[u8; 32]>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read --api-key-file {} ({e}); the server runs as uid {}, which must be able to read it",
            path.display(),
            // SAFETY: getuid has no preconditions and cannot fail.
            unsafe { libc::getuid() }
        )
    })?;
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        ApiKey(line.to_owned())
            .check()
            .map_err(|why| format!("{why} (--api-key-file {}, line {})", path.display(), n + 1))?;
        let d = digest(line.as_bytes());
        if !keys.contains(&d) {
            keys.push(d);
        }
    }
    Ok(keys)
}

/// What a reload of `--api-key-file` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reloaded {
    /// Whether the file's keys differ from those in use before.
    pub changed: bool,
    /// Keys the file holds now.
    pub keys: usize,
    /// Keys removed from the file and still valid for the rotation grace.
    pub retiring: usize,
}

impl ApiKeys {
    /// The keys of `--api-key`/`TCH_SERVE_API_KEY` and of `--api-key-file`, if given. An error
    /// names where the bad key came from (never the key itself).
    pub fn new(
        keys: &[ApiKey],
        file: Option<&Path>,
        protect_metrics: bool,
    ) -> Result<Self, String> {
        let mut fixed = Vec::new();
        for key in keys {
            key.check()
                .map_err(|why| format!("{why} (--api-key / TCH_SERVE_API_KEY)"))?;
            fixed.push(digest(key.0.as_bytes()));
        }
        let current = match file {
            Some(path) => {
                let keys = read_key_file(path)?;
                if keys.is_empty() {
                    tracing::warn!(
                        file = %path.display(),
                        "--api-key-file holds no key (only blank lines and comments)"
                    );
                }
                keys
            }
            None => Vec::new(),
        };
        Ok(Self {
            enabled: !fixed.is_empty() || !current.is_empty(),
            fixed,
            file: file.map(Path::to_path_buf),
            grace: Duration::ZERO,
            from_file: RwLock::new(FileKeys {
                current,
                retiring: Vec::new(),
            }),
            protect_metrics,
        })
    }

    /// How long a key removed from the file stays valid (`--api-key-rotation-grace-secs`).
    pub fn with_rotation_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The key file, if one is configured.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// Reads `--api-key-file` again and puts its keys in use (see the module's notes). On an
    /// error, the keys in use are kept.
    pub fn reload(&self) -> Result<Reloaded, String> {
        let Some(path) = &self.file else {
            return Err("no --api-key-file to read".into());
        };
        let keys = read_key_file(path)?;
        if keys.is_empty() && self.fixed.is_empty() && self.enabled {
            return Err(format!(
                "--api-key-file {} now holds no key; keeping the keys in use (remove the flag and restart to serve without keys)",
                path.display()
            ));
        }
        let now = Instant::now();
        let mut f = self.from_file.write().unwrap();
        let changed = {
            let mut a = f.current.clone();
            let mut b = keys.clone();
            a.sort_unstable();
            b.sort_unstable();
            a != b
        };
        let until = now + self.grace;
        let removed: Vec<[u8; 32]> = f
            .current
            .iter()
            .filter(|d| !keys.contains(d))
            .copied()
            .collect();
        f.retiring
            .retain(|(d, at)| *at > now && !keys.contains(d) && !removed.contains(d));
        if !self.grace.is_zero() {
            f.retiring.extend(removed.into_iter().map(|d| (d, until)));
        }
        f.current = keys;
        Ok(Reloaded {
            changed,
            keys: f.current.len(),
            retiring: f.retiring.len(),
        })
    }

    /// Keys valid now: (active, retiring).
    pub fn counts(&self) -> (usize, usize) {
        let f = self.from_file.read().unwrap();
        let now = Instant::now();
        (
            self.fixed.len() + f.current.len(),
            f.retiring.iter().filter(|(_, at)| *at > now).count(),
        )
    }

    /// Whether any key is configured (if not, nothing is checked).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Keys valid now, retiring ones included.
    pub fn len(&self) -> usize {
        let (active, retiring) = self.counts();
        active + retiring
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
        let now = Instant::now();
        let f = self.from_file.read().unwrap();
        // Every key is compared, whichever matches: the time does not depend on which.
        let matched = self
            .fixed
            .iter()
            .chain(&f.current)
            .chain(
                f.retiring
                    .iter()
                    .filter(|(_, at)| *at > now)
                    .map(|(d, _)| d),
            )
            .fold(Choice::from(0), |acc, d| acc | d.ct_eq(&presented));
        if bool::from(matched) {
            Ok(())
        } else {
            Err(Refusal::Invalid)
        }
    }
}

/// What identifies a version of the key file: its device, inode, length and modification time,
/// through symbolic links (a Kubernetes Secret's file is a link that an update points elsewhere).
fn fingerprint(path: &Path) -> Option<(u64, u64, u64, Option<SystemTime>)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.len(), m.modified().ok()))
}

/// Reloads `--api-key-file` whenever it changes (looked at every `poll`; never if zero) and on
/// SIGHUP, until `stop`; each outcome is logged and counted.
pub async fn watch_key_file(
    keys: std::sync::Arc<ApiKeys>,
    poll: Duration,
    metrics: std::sync::Arc<crate::telemetry::Metrics>,
    stop: tokio_util::sync::CancellationToken,
) {
    let Some(path) = keys.file().map(Path::to_path_buf) else {
        return;
    };
    let publish = |keys: &ApiKeys| {
        let (active, retiring) = keys.counts();
        metrics
            .api_keys
            .with_label_values(&["active"])
            .set(active as i64);
        metrics
            .api_keys
            .with_label_values(&["retiring"])
            .set(retiring as i64);
    };
    publish(&keys);
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut seen = fingerprint(&path);
    let every = if poll.is_zero() {
        Duration::from_secs(3600)
    } else {
        poll
    };
    loop {
        let why = tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {
                let now = fingerprint(&path);
                if poll.is_zero() || now == seen {
                    publish(&keys);
                    continue;
                }
                "changed"
            }
            Some(()) = async {
                match hangup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => "SIGHUP",
        };
        seen = fingerprint(&path);
        let outcome = match keys.reload() {
            Ok(r) => {
                tracing::info!(
                    file = %path.display(),
                    trigger = why,
                    changed = r.changed,
                    keys = r.keys,
                    retiring = r.retiring,
                    grace_secs = keys.grace.as_secs(),
                    "--api-key-file read again"
                );
                if r.changed { "changed" } else { "unchanged" }
            }
            Err(e) => {
                tracing::error!(file = %path.display(), trigger = why, error = %e, "--api-key-file not reloaded");
                "failed"
            }
        };
        metrics.api_key_reloads.with_label_values(&[outcome]).inc();
        publish(&keys);
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
    fn a_reload_retires_removed_keys_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "old-key\n").unwrap();
        let k = ApiKeys::new(&[], Some(&path), false)
            .unwrap()
            .with_rotation_grace(Duration::from_millis(300));
        assert_eq!(k.verify(Some(b"Bearer old-key")), Ok(()));
        assert_eq!(k.verify(Some(b"Bearer new-key")), Err(Refusal::Invalid));
        std::fs::write(&path, "# rotated\nnew-key\n").unwrap();
        let r = k.reload().unwrap();
        assert_eq!((r.changed, r.keys, r.retiring), (true, 1, 1));
        // Both valid during the grace.
        assert_eq!(k.verify(Some(b"Bearer new-key")), Ok(()));
        assert_eq!(k.verify(Some(b"Bearer old-key")), Ok(()));
        assert_eq!(k.counts(), (1, 1));
        std::thread::sleep(Duration::from_millis(350));
        assert_eq!(k.verify(Some(b"Bearer old-key")), Err(Refusal::Invalid));
        assert_eq!(k.verify(Some(b"Bearer new-key")), Ok(()));
        assert_eq!(k.counts(), (1, 0));
        // The same file again: nothing changes.
        assert!(!k.reload().unwrap().changed);
    }

    #[test]
    fn a_bad_or_empty_file_keeps_the_keys_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "key-one\n").unwrap();
        let k = ApiKeys::new(&[], Some(&path), false).unwrap();
        for bad in ["# nothing left\n", "two words\n"] {
            std::fs::write(&path, bad).unwrap();
            let err = k.reload().unwrap_err();
            assert!(err.contains("--api-key-file"), "{err}");
            assert!(k.enabled());
            assert_eq!(k.verify(Some(b"Bearer key-one")), Ok(()));
            assert_eq!(k.verify(None), Err(Refusal::Missing));
        }
        std::fs::remove_file(&path).unwrap();
        assert!(k.reload().is_err());
        assert_eq!(k.verify(Some(b"Bearer key-one")), Ok(()));
        // With no grace, a removed key is refused at once.
        std::fs::write(&path, "key-two\n").unwrap();
        let r = k.reload().unwrap();
        assert_eq!((r.keys, r.retiring), (1, 0));
        assert_eq!(k.verify(Some(b"Bearer key-one")), Err(Refusal::Invalid));
        assert_eq!(k.verify(Some(b"Bearer key-two")), Ok(()));
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
