//! One-time-code delivery, pluggable: the dev sender writes codes to
//! `<data>/otp.log` (and the log); the webhook sender POSTs JSON to an HTTP
//! endpoint (an SMS/e-mail gateway). Both run on the blocking pool.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Mutex;

/// Delivers a code to an identifier.
pub trait OtpSender: Send + Sync + std::fmt::Debug {
    /// Sends `code` to `identifier` (blocking).
    fn send(&self, identifier: &str, code: &str) -> Result<(), String>;
}

/// Development sender: appends `<identifier> <code>` lines to a file.
#[derive(Debug)]
pub struct DevFileSender {
    path: PathBuf,
    lock: Mutex<()>,
}

impl DevFileSender {
    /// Appends to `path`.
    #[must_use]
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            lock: Mutex::new(()),
        }
    }
}

impl OtpSender for DevFileSender {
    fn send(&self, identifier: &str, code: &str) -> Result<(), String> {
        let _guard = self
            .lock
            .lock()
            .map_err(|_| "otp log lock poisoned".to_owned())?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        writeln!(f, "{identifier} {code}").map_err(|e| e.to_string())?;
        tracing::info!(identifier, code, "dev otp sender: one-time code");
        Ok(())
    }
}

/// Webhook sender: `POST url` with `{"identifier": .., "code": ..}`.
#[derive(Debug)]
pub struct WebhookSender {
    host_port: String,
    host: String,
    path: String,
}

/// Splits `http://host[:port]/path` into (host:port, host, path).
#[must_use]
pub fn parse_http_url(url: &str) -> Option<(String, String, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return None;
    }
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    let host_port = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    Some((host_port, host.to_owned(), path.to_owned()))
}

impl WebhookSender {
    /// A sender for `url` (checked by config validation).
    pub fn new(url: &str) -> Result<Self, String> {
        let (host_port, host, path) =
            parse_http_url(url).ok_or_else(|| format!("bad webhook url {url}"))?;
        Ok(Self {
            host_port,
            host,
            path,
        })
    }
}

impl OtpSender for WebhookSender {
    fn send(&self, identifier: &str, code: &str) -> Result<(), String> {
        let body = serde_json::json!({ "identifier": identifier, "code": code }).to_string();
        let mut s = TcpStream::connect(&self.host_port).map_err(|e| e.to_string())?;
        let t = Some(crate::clock::ms(5000));
        s.set_read_timeout(t).map_err(|e| e.to_string())?;
        s.set_write_timeout(t).map_err(|e| e.to_string())?;
        write!(
            s,
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.path,
            self.host,
            body.len()
        )
        .map_err(|e| e.to_string())?;
        let mut head = [0u8; 64];
        let n = s.read(&mut head).map_err(|e| e.to_string())?;
        let line = String::from_utf8_lossy(&head[..n]);
        let ok = line
            .split_whitespace()
            .nth(1)
            .is_some_and(|c| c.starts_with('2'));
        if ok {
            Ok(())
        } else {
            Err(format!(
                "webhook answered {}",
                line.lines().next().unwrap_or("")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_http_url("http://127.0.0.1:8080/sms"),
            Some(("127.0.0.1:8080".into(), "127.0.0.1".into(), "/sms".into()))
        );
        assert_eq!(
            parse_http_url("http://gw"),
            Some(("gw:80".into(), "gw".into(), "/".into()))
        );
        assert_eq!(parse_http_url("https://gw/x"), None);
    }
}
