//! TLS trust: a CA file (normal certificate verification, TLS 1.3 only,
//! `ring` provider), or a pinned SHA-256 fingerprint.
//!
//! A pin matches the DER of the server's end-entity certificate or of any
//! certificate the server presents in its chain; the handshake signature is
//! still verified with the end-entity key, so a pin cannot be satisfied by
//! replaying someone else's certificate. To pin a CA, the server must present
//! that CA in its chain; otherwise pin the end-entity certificate or use
//! `--ca`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use crate::error::ClientError;

/// How the client decides to trust the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsTrust {
    /// Verify the chain against the CA certificate(s) in this PEM file, and
    /// the host name or IP address against the certificate.
    CaFile(PathBuf),
    /// Accept exactly the certificate (end-entity or one presented in the
    /// chain) whose DER has this SHA-256.
    PinnedSha256([u8; 32]),
}

impl TlsTrust {
    /// Parses a fingerprint: 64 hex digits, optionally separated by colons
    /// (the form the server prints at start-up).
    pub fn parse_pin(s: &str) -> Result<Self, ClientError> {
        let digits: String = s.chars().filter(|c| *c != ':').collect();
        let mut pin = [0u8; 32];
        hex::decode_to_slice(&digits, &mut pin).map_err(|_| {
            ClientError::InvalidArgument(format!(
                "pin must be a SHA-256 fingerprint (64 hex digits, colons allowed), got {s:?}"
            ))
        })?;
        Ok(TlsTrust::PinnedSha256(pin))
    }
}

/// SHA-256 of a DER certificate, colon-separated uppercase hex (the format
/// the server prints).
#[must_use]
pub fn fingerprint(cert_der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, cert_der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// ALPN protocol the server offers.
const ALPN: &[u8] = b"starling/1";

/// Builds the rustls client configuration for `trust`.
pub(crate) fn client_config(trust: &TlsTrust) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let mut cfg = match trust {
        TlsTrust::CaFile(path) => builder
            .with_root_certificates(load_roots(path)?)
            .with_no_client_auth(),
        TlsTrust::PinnedSha256(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                pin: *pin,
                provider,
            }))
            .with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(cfg))
}

fn load_roots(path: &Path) -> Result<rustls::RootCertStore, ClientError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| ClientError::Tls(format!("reading CA file {}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ClientError::Tls(format!("parsing CA file {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(ClientError::Tls(format!(
            "CA file {} holds no certificate",
            path.display()
        )));
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| ClientError::Tls(format!("CA file {}: {e}", path.display())))?;
    }
    Ok(roots)
}

/// Accepts the server when a presented certificate matches the pin; the
/// handshake signature is checked as usual.
#[derive(Debug)]
struct PinnedVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let matches = std::iter::once(end_entity)
            .chain(intermediates)
            .any(|c| ring::digest::digest(&ring::digest::SHA256, c).as_ref() == self.pin);
        if matches {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The name to verify and send as SNI for `host` (a DNS name or an IP).
pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>, ClientError> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned())
        .map_err(|_| ClientError::InvalidArgument(format!("{host:?} is not a valid server name")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse_with_or_without_colons() {
        let hex64 = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(
            TlsTrust::parse_pin(&hex64).unwrap(),
            TlsTrust::PinnedSha256([0xab; 32])
        );
        assert_eq!(
            TlsTrust::parse_pin(&colons).unwrap(),
            TlsTrust::PinnedSha256([0xab; 32])
        );
        assert!(TlsTrust::parse_pin("abcd").is_err());
        assert!(TlsTrust::parse_pin(&"zz".repeat(32)).is_err());
        assert_eq!(fingerprint(b"").len(), 32 * 3 - 1);
    }

    #[test]
    fn server_names_accept_hosts_and_ips() {
        assert!(server_name("localhost").is_ok());
        assert!(matches!(
            server_name("127.0.0.1").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("[::1]").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(server_name("bad name!").is_err());
    }

    #[test]
    fn a_missing_or_empty_ca_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = client_config(&TlsTrust::CaFile(dir.path().join("nope.pem"))).unwrap_err();
        assert!(err.to_string().contains("nope.pem"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let err = client_config(&TlsTrust::CaFile(empty)).unwrap_err();
        assert!(err.to_string().contains("no certificate"), "{err}");
        assert!(client_config(&TlsTrust::PinnedSha256([0; 32])).is_ok());
    }
}
