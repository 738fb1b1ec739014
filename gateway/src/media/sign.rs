//! Grant URLs: `{base}/v1/media/{id}?size=..&type=..&exp=..&sig=..` (upload) and
//! `{base}/v1/media/{id}?exp=..&sig=..` (download), `sig` the hex HMAC-SHA256 under the server's
//! media key of `"PUT\n" id "\n" size "\n" type "\n" exp` or `"GET\n" id "\n" exp`
//! (`protocol/proto/media.proto`). Verification is constant-time (ring).

use ring::hmac;

/// The path prefix of every object URL.
pub(crate) const PATH_PREFIX: &str = "/v1/media/";

/// What a URL grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Grant {
    /// PUT exactly `size` bytes of `content_type`.
    Put { size: u64, content_type: String },
    /// GET the object.
    Get,
}

/// Signs and checks grant URLs with one key.
#[derive(Debug)]
pub(crate) struct Signer {
    key: hmac::Key,
}

/// Why a URL is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UrlError {
    /// Not a URL this endpoint made (HTTP 400 or 404).
    Malformed(&'static str),
    /// The signature does not match (altered, or made for another method): HTTP 403.
    BadSignature,
    /// Past its expiry: HTTP 403.
    Expired,
}

impl Signer {
    /// A signer with a 32-byte key.
    pub(crate) fn new(key: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
        }
    }

    fn input(id: &str, grant: &Grant, exp: u64) -> String {
        match grant {
            Grant::Put { size, content_type } => {
                format!("PUT\n{id}\n{size}\n{content_type}\n{exp}")
            }
            Grant::Get => format!("GET\n{id}\n{exp}"),
        }
    }

    /// The path and query of a URL granting `grant` on `id` until `exp` (ms).
    pub(crate) fn path_and_query(&self, id: &str, grant: &Grant, exp: u64) -> String {
        let sig = hex::encode(hmac::sign(
            &self.key,
            Self::input(id, grant, exp).as_bytes(),
        ));
        match grant {
            Grant::Put { size, content_type } => format!(
                "{PATH_PREFIX}{id}?size={size}&type={}&exp={exp}&sig={sig}",
                percent_encode(content_type)
            ),
            Grant::Get => format!("{PATH_PREFIX}{id}?exp={exp}&sig={sig}"),
        }
    }

    /// Checks a request's path and query for `method` at `now_ms`: the object id and what the
    /// URL grants.
    pub(crate) fn check(
        &self,
        method: &str,
        path: &str,
        query: &str,
        now_ms: u64,
    ) -> Result<(String, Grant), UrlError> {
        let id = path
            .strip_prefix(PATH_PREFIX)
            .filter(|id| starling_router::is_media_id(id))
            .ok_or(UrlError::Malformed("not a media object path"))?;
        let (mut size, mut ty, mut exp, mut sig) = (None, None, None, None);
        for kv in query.split('&') {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let slot = match k {
                "size" => &mut size,
                "type" => &mut ty,
                "exp" => &mut exp,
                "sig" => &mut sig,
                _ => return Err(UrlError::Malformed("unknown query parameter")),
            };
            if slot.replace(v).is_some() {
                return Err(UrlError::Malformed("repeated query parameter"));
            }
        }
        let exp: u64 = exp
            .and_then(|e| e.parse().ok())
            .ok_or(UrlError::Malformed("no exp"))?;
        let sig = sig
            .and_then(|s| hex::decode(s).ok())
            .ok_or(UrlError::Malformed("no sig"))?;
        let grant = match method {
            "PUT" => Grant::Put {
                size: size
                    .and_then(|s| s.parse().ok())
                    .ok_or(UrlError::BadSignature)?,
                content_type: ty.and_then(percent_decode).ok_or(UrlError::BadSignature)?,
            },
            _ if size.is_some() || ty.is_some() => return Err(UrlError::BadSignature),
            _ => Grant::Get,
        };
        hmac::verify(&self.key, Self::input(id, &grant, exp).as_bytes(), &sig)
            .map_err(|_| UrlError::BadSignature)?;
        if now_ms > exp {
            return Err(UrlError::Expired);
        }
        Ok((id.to_owned(), grant))
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn split(pq: &str) -> (&str, &str) {
        pq.split_once('?').unwrap()
    }

    #[test]
    fn a_signed_url_checks_and_any_change_is_refused() {
        let s = Signer::new(&[7; 32]);
        let put = Grant::Put {
            size: 10,
            content_type: "image/svg+xml".into(),
        };
        let pq = s.path_and_query(ID, &put, 5_000);
        assert!(pq.contains("type=image%2Fsvg%2Bxml"), "{pq}");
        let (p, q) = split(&pq);
        assert_eq!(
            s.check("PUT", p, q, 5_000),
            Ok((ID.to_owned(), put.clone()))
        );
        assert_eq!(s.check("PUT", p, q, 5_001), Err(UrlError::Expired));
        // Another method, size, type, expiry or key: refused.
        assert_eq!(s.check("GET", p, q, 0), Err(UrlError::BadSignature));
        let q2 = q.replace("size=10", "size=11");
        assert_eq!(s.check("PUT", p, &q2, 0), Err(UrlError::BadSignature));
        let q2 = q.replace("svg", "png");
        assert_eq!(s.check("PUT", p, &q2, 0), Err(UrlError::BadSignature));
        let q2 = q.replace("exp=5000", "exp=9000");
        assert_eq!(s.check("PUT", p, &q2, 0), Err(UrlError::BadSignature));
        assert_eq!(
            Signer::new(&[8; 32]).check("PUT", p, q, 0),
            Err(UrlError::BadSignature)
        );
        let get = s.path_and_query(ID, &Grant::Get, 5_000);
        let (gp, gq) = split(&get);
        assert_eq!(s.check("GET", gp, gq, 1), Ok((ID.to_owned(), Grant::Get)));
        assert_eq!(s.check("PUT", gp, gq, 1), Err(UrlError::BadSignature));
        // Another object under the same signature.
        let other = gp.replace("0123", "3210");
        assert_eq!(s.check("GET", &other, gq, 1), Err(UrlError::BadSignature));
        assert!(matches!(
            s.check("GET", "/v1/media/xyz", gq, 1),
            Err(UrlError::Malformed(_))
        ));
        assert!(matches!(
            s.check("GET", gp, "exp=1", 1),
            Err(UrlError::Malformed(_))
        ));
    }
}
