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

/// The files of the development TLS set, in the order they are checked.
const SET: [&str; 3] = ["ca.pem", "server.pem", "server.key"];

/// Loads the TLS material from `<data>/tls/`, generating it if none of its
/// files exists.
///
/// A new set is generated in `<data>/tls.new/` (each file written with
/// [`crate::fsutil::write_atomic`]) and that directory is renamed to
/// `<data>/tls`, so a crash leaves either no set or a whole one. A set that
/// is partly there (a file missing, empty or not PEM) is refused with an
/// error naming the file: generating a new CA over one that clients may
/// already trust would break them silently.
///
/// # Errors
/// The set is incomplete or damaged, or it could not be written.
pub fn ensure_dev_material(data_dir: &Path) -> anyhow::Result<TlsMaterial> {
    let dir = data_dir.join("tls");
    let ca_pem = dir.join("ca.pem");
    let server_pem = dir.join("server.pem");
    let server_key = dir.join("server.key");
    let present = SET
        .iter()
        .filter(|f| dir.join(f).symlink_metadata().is_ok())
        .count();
    let generated = present == 0;
    if generated {
        generate_set(data_dir, &dir)?;
    }
    check_set(&dir)?;
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

/// Refuses a set with a file missing, empty or not parseable, naming it.
fn check_set(dir: &Path) -> anyhow::Result<()> {
    for name in SET {
        let path = dir.join(name);
        let problem = match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("is missing".to_owned()),
            Err(e) => Some(format!("cannot be read ({e})")),
            Ok(m) if m.len() == 0 => Some("is empty".to_owned()),
            Ok(_) => {
                let parsed = if name == "server.key" {
                    PrivateKeyDer::from_pem_file(&path).map(|_| ())
                } else {
                    CertificateDer::from_pem_file(&path).map(|_| ())
                };
                parsed.err().map(|e| format!("is not valid PEM ({e})"))
            }
        };
        if let Some(problem) = problem {
            anyhow::bail!(
                "the TLS material in {dir} is incomplete: {path} {problem}. Refusing to generate a \
                 new development CA over one that clients may already trust. Restore the file from \
                 a backup, or delete ca.pem, server.pem and server.key in {dir} to generate a new \
                 CA (clients must then be given the new ca.pem)",
                dir = dir.display(),
                path = path.display(),
            );
        }
    }
    Ok(())
}

/// Generates a set in `<data>/tls.new/` and publishes it as `dir` with one
/// rename (over an empty `dir`, if one exists).
fn generate_set(data_dir: &Path, dir: &Path) -> anyhow::Result<()> {
    use crate::fsutil::{fsync_dir, write_atomic};
    let staging = data_dir.join("tls.new");
    // Left by a start that crashed while generating: never published.
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .with_context(|| format!("removing {}", staging.display()))?;
    }
    std::fs::create_dir(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let (ca, cert, key) = generate()?;
    write_atomic(&staging.join("server.key"), key.as_bytes(), 0o600)?;
    write_atomic(&staging.join("server.pem"), cert.as_bytes(), 0o644)?;
    write_atomic(&staging.join("ca.pem"), ca.as_bytes(), 0o644)?;
    match std::fs::rename(&staging, dir) {
        Ok(()) => {}
        // `dir` holds other files (none of the set): move the files one by
        // one, the CA last, so a CA is never there without its server pair.
        Err(e) if dir.is_dir() => {
            tracing::debug!(error = %e, "{} is not empty; moving the files", dir.display());
            for name in ["server.key", "server.pem", "ca.pem"] {
                std::fs::rename(staging.join(name), dir.join(name))
                    .with_context(|| format!("moving {name} into {}", dir.display()))?;
                fsync_dir(dir)?;
            }
            std::fs::remove_dir(&staging)
                .with_context(|| format!("removing {}", staging.display()))?;
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("renaming {} to {}", staging.display(), dir.display()));
        }
    }
    fsync_dir(data_dir)?;
    Ok(())
}

/// A new CA and a server certificate signed by it, as PEM: (CA certificate,
/// server certificate, server key).
fn generate() -> anyhow::Result<(String, String, String)> {
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
    Ok((ca_cert.pem(), cert.pem(), key.serialize_pem()))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_a_whole_set_once_and_loads_it_afterwards() {
        let data = tempfile::tempdir().unwrap();
        let first = ensure_dev_material(data.path()).unwrap();
        assert!(first.generated);
        assert!(!data.path().join("tls.new").exists());
        let second = ensure_dev_material(data.path()).unwrap();
        assert!(!second.generated);
        assert_eq!(first.ca_sha256, second.ca_sha256);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&second.server_key)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        server_config(&second).unwrap();
    }

    #[test]
    fn a_partial_set_is_refused_naming_the_file() {
        for (name, damage) in [
            ("ca.pem", "empty"),
            ("server.pem", "missing"),
            ("server.key", "missing"),
            ("server.key", "garbage"),
        ] {
            let data = tempfile::tempdir().unwrap();
            let m = ensure_dev_material(data.path()).unwrap();
            let path = data.path().join("tls").join(name);
            match damage {
                "empty" => std::fs::write(&path, b"").unwrap(),
                "missing" => std::fs::remove_file(&path).unwrap(),
                _ => std::fs::write(&path, b"not pem").unwrap(),
            }
            let e = format!("{:#}", ensure_dev_material(data.path()).unwrap_err());
            assert!(e.contains(&path.display().to_string()), "{e}");
            assert!(e.contains("Refusing to generate"), "{e}");
            // Nothing was regenerated: the CA is the one clients trust.
            if name != "ca.pem" {
                let ca = CertificateDer::from_pem_file(&m.ca_pem).unwrap();
                let d = ring::digest::digest(&ring::digest::SHA256, &ca);
                assert_eq!(hex::encode_upper(d.as_ref()), m.ca_sha256.replace(':', ""));
            }
        }
    }

    #[test]
    fn a_leftover_staging_dir_and_an_existing_tls_dir_are_handled() {
        // A crashed generation left tls.new/; tls/ exists and holds an
        // unrelated file but none of the set.
        let data = tempfile::tempdir().unwrap();
        std::fs::create_dir(data.path().join("tls.new")).unwrap();
        std::fs::write(data.path().join("tls.new/ca.pem"), b"half").unwrap();
        std::fs::create_dir(data.path().join("tls")).unwrap();
        std::fs::write(data.path().join("tls/README"), b"mine").unwrap();
        let m = ensure_dev_material(data.path()).unwrap();
        assert!(m.generated);
        assert!(!data.path().join("tls.new").exists());
        assert_eq!(
            std::fs::read(data.path().join("tls/README")).unwrap(),
            b"mine"
        );
        assert!(!ensure_dev_material(data.path()).unwrap().generated);

        // An empty tls/ (created by a start that crashed before writing).
        let data = tempfile::tempdir().unwrap();
        std::fs::create_dir(data.path().join("tls")).unwrap();
        assert!(ensure_dev_material(data.path()).unwrap().generated);
    }
}
