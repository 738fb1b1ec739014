//! One-time-code delivery, pluggable: the dev sender appends codes to
//! `<data>/otp.log` (and logs them); the webhook sender POSTs JSON to an HTTP
//! endpoint (an SMS/e-mail gateway). Both run on the blocking pool.
//!
//! # `otp.log`
//!
//! The development sender's file, for operators and test scripts (never
//! written with the webhook sender). One line per code sent, appended:
//!
//! ```text
//! <identifier> SP <code> LF
//! ```
//!
//! - `<identifier>` is the identifier as the server stored it: an E.164
//!   phone number (`+14155550100`) or a lower-cased e-mail address
//!   (`ana@example.org`). Identifiers are validated before a code is sent
//!   (`accounts::ident`): they hold no whitespace and no control characters,
//!   so a line has exactly one space and the identifier is everything before
//!   it.
//! - `<code>` is 6 ASCII digits.
//! - The newest line for an identifier holds its current code (a new code
//!   replaces the previous one).
//!
//! Each line is written with one `write(2)` on a file opened with
//! `O_APPEND`, then `fdatasync`ed before the client is told `OtpSent`, so
//! concurrent senders never interleave within a line, and a code a client
//! was told about is in the file after a crash. (When the file is created,
//! its directory is fsynced too.)

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Mutex;

/// Delivers a code to an identifier.
pub trait OtpSender: Send + Sync + std::fmt::Debug {
    /// Sends `code` to `identifier` (blocking).
    fn send(&self, identifier: &str, code: &str) -> Result<(), String>;
}

/// Development sender: appends `<identifier> <code>` lines to a file (the
/// module docs give the format).
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

/// One `otp.log` line, or `None` if the fields could break the format
/// (validation upstream makes that a bug, refused here all the same).
fn otp_line(identifier: &str, code: &str) -> Option<String> {
    let one_field =
        |s: &str| !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control());
    (one_field(identifier) && code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit()))
        .then(|| format!("{identifier} {code}\n"))
}

impl OtpSender for DevFileSender {
    fn send(&self, identifier: &str, code: &str) -> Result<(), String> {
        let line = otp_line(identifier, code)
            .ok_or_else(|| "refusing to write a malformed otp.log line".to_owned())?;
        let _guard = self
            .lock
            .lock()
            .map_err(|_| "otp log lock poisoned".to_owned())?;
        let created = !self.path.exists();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        // One write per line: O_APPEND places it whole at the end.
        let n = f
            .write(line.as_bytes())
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        if n != line.len() {
            return Err(format!(
                "{}: short write ({n} of {} bytes)",
                self.path.display(),
                line.len()
            ));
        }
        // The line is durable before the client hears OtpSent (and the file's directory entry,
        // when this write created it).
        f.sync_data()
            .map_err(|e| format!("fsync {}: {e}", self.path.display()))?;
        if created && let Some(dir) = self.path.parent() {
            crate::fsutil::fsync_dir(dir).map_err(|e| e.to_string())?;
        }
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
    fn the_dev_sender_appends_one_line_per_code() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("otp.log");
        let s = DevFileSender::new(path.clone());
        s.send("+14155550100", "012345").unwrap();
        s.send("ana@example.org", "999999").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "+14155550100 012345\nana@example.org 999999\n"
        );
        // Fields that would break a line are refused, and nothing is written.
        for (ident, code) in [
            ("x\n+1999 000000@rel.test", "123456"),
            ("a b@example.org", "123456"),
            ("", "123456"),
            ("ana@example.org", "12345"),
            ("ana@example.org", "12345\n"),
        ] {
            assert!(s.send(ident, code).is_err(), "{ident:?} {code:?}");
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
    }

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
