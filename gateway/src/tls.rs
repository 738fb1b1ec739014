//! TLS material: on first start a development CA and a server certificate
//! signed by it are generated in `<data>/tls/`; later starts load them.
//! Only TLS 1.3 is offered, with the `ring` provider (X25519 from aws-lc,
//! see [`crate::kx`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Paths and fingerprint of the TLS material in use.
#[derive(Debug, Clone)]
pub struct TlsMaterial {
    /// The dev CA certificate (give it to clients).
    pub ca_pem: PathBuf,
    /// The server certificate.
    pub server_pem: PathBuf,
    /// The server key.
    pub server_key: PathBuf,
    /// SHA-256 of the CA certificate (DER), colon-separated hex.
    pub ca_sha256: String,
    /// True when this start generated them.
    pub generated: bool,
}

/// Loads the TLS material from `<data>/tls/`, generating it if absent.
pub fn ensure_dev_material(data_dir: &Path) -> anyhow::Result<TlsMaterial> {
    let dir = data_dir.join("tls");
    let ca_pem = dir.join("ca.pem");
    let server_pem = dir.join("server.pem");
    let server_key = dir.join("server.key");
    let mut generated = false;
    if !server_pem.exists() || !server_key.exists() || !ca_pem.exists() {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        generate(&ca_pem, &server_pem, &server_key)?;
        generated = true;
    }
    let ca_der = CertificateDer::from_pem_file(&ca_pem)
        .with_context(|| format!("reading {}", ca_pem.display()))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &ca_der);
    let ca_sha256 = digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    Ok(TlsMaterial {
        ca_pem,
        server_pem,
        server_key,
        ca_sha256,
        generated,
    })
}

fn generate(ca_pem: &Path, server_pem: &Path, server_key: &Path) -> anyhow::Result<()> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Starling development CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).context("signing the CA")?;
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate().context("generating the server key")?;
    let mut params = CertificateParams::new(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ])?;
    params
        .distinguished_name
        .push(DnType::CommonName, "starling server");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params
        .signed_by(&key, &issuer)
        .context("signing the server certificate")?;

    write_private(server_key, key.serialize_pem().as_bytes())?;
    std::fs::write(server_pem, cert.pem())?;
    std::fs::write(ca_pem, ca_cert.pem())?;
    Ok(())
}

/// Writes a file readable by the owner only.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// The rustls server configuration (TLS 1.3 only).
pub fn server_config(m: &TlsMaterial) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&m.server_pem)
        .with_context(|| format!("reading {}", m.server_pem.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {}", m.server_pem.display()))?;
    let key = PrivateKeyDer::from_pem_file(&m.server_key)
        .with_context(|| format!("reading {}", m.server_key.display()))?;
    // The server picks the suite: AES-128-GCM with SHA-256 first. The
    // handshake's transcript hash and key schedule (a few dozen HMACs) then
    // run on SHA-256, which has CPU instructions (SHA-NI), where ring's
    // SHA-384 does not (docs/design/performance-decisions.md,
    // "TLS_AES_128_GCM_SHA256 first"). All three TLS 1.3 suites stay enabled.
    let mut provider = rustls::crypto::ring::default_provider();
    {
        use rustls::crypto::ring::cipher_suite as cs;
        provider.cipher_suites = vec![
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
        ];
    }
    // X25519 (every client's first key share) from aws-lc, about twice as
    // fast as ring's (docs/design/performance-decisions.md). P-256 and P-384
    // stay ring's.
    provider.kx_groups = vec![
        crate::kx::X25519,
        rustls::crypto::ring::kx_group::SECP256R1,
        rustls::crypto::ring::kx_group::SECP384R1,
    ];
    let provider = Arc::new(provider);
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("server certificate and key do not match")?;
    cfg.alpn_protocols = vec![b"starling/1".to_vec()];
    cfg.ignore_client_order = true;
    // Stateless TLS 1.3 session tickets (ring's ticketer: AEAD keys rotated
    // every 6 h, nothing stored per session): a reconnecting mobile client
    // resumes with a PSK, skipping the certificate signature and its own
    // chain verification. One ticket per connection is enough: each
    // connection hands out the ticket for the next. The stateful session
    // cache is not needed for tickets.
    cfg.ticketer =
        rustls::crypto::ring::Ticketer::new().map_err(|e| anyhow::anyhow!("ticketer: {e}"))?;
    cfg.send_tls13_tickets = 1;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(cfg))
}
