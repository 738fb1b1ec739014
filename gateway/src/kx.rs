//! The server's X25519 key exchange, backed by aws-lc-rs instead of ring.
//!
//! A full TLS 1.3 handshake costs the server one X25519 key generation and
//! one agreement, the largest item of a handshake + login with ring;
//! aws-lc's X25519 (s2n-bignum's assembly) does the pair in about half the
//! time (docs/design/performance-decisions.md, "X25519 from aws-lc-rs").
//! Everything else in the provider (the other groups, the cipher suites,
//! the certificate signature, the ticketer, the RNG rustls uses) stays
//! ring's.
//!
//! Same security as ring's group: a fresh ephemeral key per handshake, the
//! peer's share must be 32 bytes, and an all-zero shared secret (a
//! small-order peer point) is refused by aws-lc (`X25519()` fails) exactly
//! as ring refuses it.

use rustls::crypto::{ActiveKeyExchange, CompletedKeyExchange, SharedSecret, SupportedKxGroup};
use rustls::{Error, NamedGroup, PeerMisbehaved};

use aws_lc_rs::agreement;

/// X25519 (RFC 7748) for rustls, computed by aws-lc.
pub static X25519: &dyn SupportedKxGroup = &AwsLcX25519;

#[derive(Debug)]
struct AwsLcX25519;

fn generate() -> Result<(agreement::EphemeralPrivateKey, agreement::PublicKey), Error> {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let key = agreement::EphemeralPrivateKey::generate(&agreement::X25519, &rng)
        .map_err(|_| Error::FailedToGetRandomBytes)?;
    let public = key
        .compute_public_key()
        .map_err(|_| Error::FailedToGetRandomBytes)?;
    Ok((key, public))
}

fn agree(key: agreement::EphemeralPrivateKey, peer: &[u8]) -> Result<SharedSecret, Error> {
    if peer.len() != 32 {
        return Err(PeerMisbehaved::InvalidKeyShare.into());
    }
    let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, peer);
    agreement::agree_ephemeral(key, peer, (), |secret| Ok(SharedSecret::from(secret)))
        .map_err(|()| PeerMisbehaved::InvalidKeyShare.into())
}

impl SupportedKxGroup for AwsLcX25519 {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let (key, public) = generate()?;
        Ok(Box::new(Active { key, public }))
    }

    /// The server's path (TLS 1.3: the client's share is known before the
    /// server's key exists): no boxing of the half-done exchange.
    fn start_and_complete(&self, peer_pub_key: &[u8]) -> Result<CompletedKeyExchange, Error> {
        let (key, public) = generate()?;
        Ok(CompletedKeyExchange {
            group: NamedGroup::X25519,
            pub_key: public.as_ref().to_vec(),
            secret: agree(key, peer_pub_key)?,
        })
    }

    fn ffdhe_group(&self) -> Option<rustls::ffdhe_groups::FfdheGroup<'static>> {
        None
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

struct Active {
    key: agreement::EphemeralPrivateKey,
    public: agreement::PublicKey,
}

impl ActiveKeyExchange for Active {
    fn complete(self: Box<Self>, peer_pub_key: &[u8]) -> Result<SharedSecret, Error> {
        agree(self.key, peer_pub_key)
    }

    fn ffdhe_group(&self) -> Option<rustls::ffdhe_groups::FfdheGroup<'static>> {
        None
    }

    fn pub_key(&self) -> &[u8] {
        self.public.as_ref()
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7748 section 6.1: both sides agree, and the result matches ring's.
    #[test]
    fn agrees_with_ring() {
        let rng = ring::rand::SystemRandom::new();
        for _ in 0..16 {
            let theirs =
                ring::agreement::EphemeralPrivateKey::generate(&ring::agreement::X25519, &rng)
                    .unwrap();
            let theirs_pub = theirs.compute_public_key().unwrap();
            let done = X25519.start_and_complete(theirs_pub.as_ref()).unwrap();
            assert_eq!(done.group, NamedGroup::X25519);
            assert_eq!(done.pub_key.len(), 32);
            let ours = ring::agreement::UnparsedPublicKey::new(
                &ring::agreement::X25519,
                done.pub_key.clone(),
            );
            let expected = ring::agreement::agree_ephemeral(theirs, &ours, |s| s.to_vec()).unwrap();
            assert_eq!(done.secret.secret_bytes(), &expected[..]);

            // The two-step path gives a working exchange too.
            let active = X25519.start().unwrap();
            assert_eq!(active.pub_key().len(), 32);
            assert!(active.complete(theirs_pub.as_ref()).is_ok());
        }
    }

    #[test]
    fn refuses_bad_shares() {
        // Wrong length.
        assert!(X25519.start_and_complete(&[9; 31]).is_err());
        assert!(X25519.start_and_complete(&[9; 33]).is_err());
        // Small-order points give an all-zero secret: refused.
        let mut zero = [0u8; 32];
        assert!(X25519.start_and_complete(&zero).is_err());
        zero[0] = 1;
        assert!(X25519.start_and_complete(&zero).is_err());
        // The RFC 7748 / libsodium blocklist's order-8 point.
        let order8 = [
            0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f,
            0xc4, 0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16,
            0x5f, 0x49, 0xb8, 0x00,
        ];
        assert!(X25519.start_and_complete(&order8).is_err());
    }
}
