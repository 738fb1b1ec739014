//! The `[media]` table: the HTTPS media endpoint (`crate::media`).

use std::net::SocketAddr;

use serde::Deserialize;

use super::ConfigError;

/// The media endpoint: where it listens, what it accepts, how long grants and unreferenced
/// uploads live. Off unless `listen` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MediaConfig {
    /// Where the HTTPS media endpoint listens (`None`: no media; the server does not offer the
    /// "media" feature).
    pub listen: Option<SocketAddr>,
    /// The base URL clients reach the endpoint at, as put into grants (no trailing slash).
    /// Unset: `https://<the bound address>`.
    pub public_url: Option<String>,
    /// Largest object, bytes.
    pub size_bytes_max: u64,
    /// The content types an upload may have (exact, lowercase, no parameters).
    pub content_types: Vec<String>,
    /// How long a grant's URL works.
    pub grant_ttl_ms: u64,
    /// An uploaded object that no message names is deleted this long after its upload.
    pub unreferenced_gc_ms: u64,
    /// Threads of the endpoint's runtime (never the shards').
    pub threads: usize,
    /// Most connections the endpoint serves at once; more wait in the listen backlog.
    pub connections_max: usize,
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            listen: None,
            public_url: None,
            size_bytes_max: 100 * 1024 * 1024,
            content_types: [
                "image/jpeg",
                "image/png",
                "image/gif",
                "image/webp",
                "image/heic",
                "video/mp4",
                "video/quicktime",
                "audio/mpeg",
                "audio/mp4",
                "audio/ogg",
                "application/pdf",
                "application/octet-stream",
            ]
            .map(str::to_owned)
            .to_vec(),
            grant_ttl_ms: 15 * 60 * 1000,
            unreferenced_gc_ms: 24 * 60 * 60 * 1000,
            threads: 2,
            connections_max: 1024,
        }
    }
}

impl MediaConfig {
    /// Checks every value; the first bad one is reported.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        if self.size_bytes_max == 0 {
            return bad("media.size_bytes_max", "must be at least 1");
        }
        if self.content_types.is_empty() {
            return bad("media.content_types", "must list at least one type");
        }
        for t in &self.content_types {
            if !is_content_type(t) {
                return bad(
                    "media.content_types",
                    &format!("{t:?} is not a lowercase type/subtype without parameters"),
                );
            }
        }
        if self.grant_ttl_ms < 1000 || self.grant_ttl_ms > 7 * 24 * 3_600_000 {
            return bad("media.grant_ttl_ms", "between 1 s and 7 days");
        }
        if self.unreferenced_gc_ms < 1000 {
            return bad("media.unreferenced_gc_ms", "at least 1000");
        }
        if self.threads == 0 || self.threads > 64 {
            return bad("media.threads", "between 1 and 64");
        }
        if self.connections_max == 0 {
            return bad("media.connections_max", "at least 1");
        }
        if let Some(u) = &self.public_url
            && (!u.starts_with("https://") || u.ends_with('/'))
        {
            return bad(
                "media.public_url",
                "must be https://host[:port][/path], no trailing /",
            );
        }
        Ok(())
    }
}

/// `type/subtype`, lowercase token characters only (so it needs no quoting in a URL or a
/// header).
fn is_content_type(t: &str) -> bool {
    let tok = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$&^_.+-".contains(&b))
    };
    t.len() <= 255 && t.split_once('/').is_some_and(|(a, b)| tok(a) && tok(b))
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    #[test]
    fn media_settings_are_read_and_checked() {
        let c = Config::from_toml(
            "[media]\nlisten = \"127.0.0.1:0\"\nsize_bytes_max = 10\n\
             content_types = [\"image/png\"]\ngrant_ttl_ms = 5000\nunreferenced_gc_ms = 2000\n",
        )
        .unwrap();
        assert!(c.validate().is_ok());
        assert_eq!(c.media.size_bytes_max, 10);
        assert_eq!(c.media.content_types, ["image/png"]);
        for bad in [
            "[media]\nsize_bytes_max = 0\n",
            "[media]\ncontent_types = []\n",
            "[media]\ncontent_types = [\"Image/PNG\"]\n",
            "[media]\ncontent_types = [\"text/plain; charset=utf-8\"]\n",
            "[media]\ngrant_ttl_ms = 10\n",
            "[media]\nunreferenced_gc_ms = 10\n",
            "[media]\nthreads = 0\n",
            "[media]\npublic_url = \"http://x\"\n",
        ] {
            let c = Config::from_toml(bad).unwrap();
            assert!(c.validate().is_err(), "{bad}");
        }
        assert!(Config::from_toml("[media]\nlisten_at = 1\n").is_err());
    }
}
