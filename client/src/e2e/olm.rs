//! The end-to-end message container (`protocol/README.md`, "End-to-end encrypted messages
//! (client convention)"): one message body carrying, per recipient device, an Olm message
//! (pre-key or normal) of the same inner plaintext. The server stores and delivers it as
//! opaque bytes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use vodozemac::olm::{OlmMessage, SessionConfig};
use vodozemac::{Curve25519PublicKey, base64_decode, base64_encode};

use super::{DeviceKeys, PeerSession, verify_bundle};
use crate::error::ClientError;
use crate::v1;

/// The content type of an end-to-end encrypted message.
pub const CONTENT_TYPE: &str = "application/vnd.starling.olm+json";
/// The container and plaintext format version.
pub const VERSION: u32 = 1;

/// The body of an encrypted message (JSON).
#[derive(Debug, Serialize, Deserialize)]
struct Container {
    /// [`VERSION`].
    v: u32,
    /// The sending device's Curve25519 identity key (unpadded base64).
    sender_key: String,
    /// One entry per recipient device.
    recipients: Vec<Entry>,
}

/// One recipient device's Olm message.
#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    user_id: u64,
    device_id: u32,
    /// Olm message type: 0 pre-key, 1 normal.
    #[serde(rename = "type")]
    kind: u8,
    /// The Olm message (unpadded base64).
    body: String,
}

/// What each Olm message decrypts to (JSON). The ids bind it to the conversation's sender and
/// to its recipient device, so an entry cannot be replayed under another sender or device.
#[derive(Debug, Serialize, Deserialize)]
struct Plaintext {
    v: u32,
    content_type: String,
    text: String,
    sender_user_id: u64,
    sender_device_id: u32,
    recipient_user_id: u64,
    recipient_device_id: u32,
}

/// A sealed message: its body and who can read it.
#[derive(Debug)]
pub struct Sealed {
    /// The container (send it with [`CONTENT_TYPE`]).
    pub body: Vec<u8>,
    /// The devices it is encrypted for (user, device), new sessions marked `true`.
    pub devices: Vec<(u64, u32, bool)>,
    /// Devices left out, with why (a bad signature, no one-time prekey for a new session).
    pub skipped: Vec<(u64, u32, String)>,
}

/// A received message, opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// Not an end-to-end encrypted message.
    NotEncrypted,
    /// The plaintext.
    Text(String),
    /// It cannot be read here, and why.
    Undecryptable(String),
}

fn peer(user: u64, device: u32) -> String {
    format!("{user}:{device}")
}

fn plaintext_key(m: &v1::Message) -> String {
    format!("{}:{}", m.conversation_id, m.seq)
}

fn digest(body: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, body);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// A bundle's Curve25519 identity key (its signed prekey), base64, if its signature verifies.
fn listed_key(b: &v1::KeyBundle) -> Option<String> {
    if !verify_bundle(b) {
        return None;
    }
    let spk = b.signed_prekey.as_ref()?;
    Curve25519PublicKey::from_slice(&spk.public_key)
        .ok()
        .map(|k| k.to_base64())
}

impl DeviceKeys {
    /// Takes in a listing of `user`'s devices (a `FetchKeyBundles` with `list_only`: bundles
    /// without one-time prekeys) and returns the listed devices that need a bundle with a
    /// one-time prekey: those with a verified bundle and no stored session of its Curve25519
    /// key (device `me` left out). The stored sessions of `user`'s devices that the listing
    /// does not name with a verified bundle (removed), or of a key other than the listed one
    /// (the device started over), are forgotten. An empty listing forgets nothing: the server
    /// answers one for a user the caller may not see, so it says nothing about devices.
    pub fn reconcile(&mut self, me: (u64, u32), user: u64, listed: &[v1::KeyBundle]) -> Vec<u32> {
        let keys: BTreeMap<u32, String> = listed
            .iter()
            .filter(|b| b.user_id == user)
            .filter_map(|b| Some((b.device_id, listed_key(b)?)))
            .collect();
        if !listed.is_empty() {
            let prefix = format!("{user}:");
            self.sessions.retain(|peer_id, list| {
                let Some(device) = peer_id
                    .strip_prefix(&prefix)
                    .and_then(|d| d.parse::<u32>().ok())
                else {
                    return true;
                };
                match keys.get(&device) {
                    Some(key) => {
                        list.retain(|s| &s.peer_key == key);
                        !list.is_empty()
                    }
                    None => false,
                }
            });
        }
        keys.into_iter()
            .filter(|(device, key)| {
                (user, *device) != me
                    && !self
                        .sessions
                        .get(&peer(user, *device))
                        .is_some_and(|l| l.iter().any(|s| &s.peer_key == key))
            })
            .map(|(device, _)| device)
            .collect()
    }

    /// The devices (user, device) this account holds a session with.
    #[must_use]
    pub fn session_devices(&self) -> Vec<(u64, u32)> {
        self.sessions
            .iter()
            .filter(|(_, l)| !l.is_empty())
            .filter_map(|(k, _)| {
                let (u, d) = k.split_once(':')?;
                Some((u.parse().ok()?, d.parse().ok()?))
            })
            .collect()
    }

    /// Encrypts `text` from device `me` (user, device) for every device in `bundles`: with the
    /// stored session of the device's identity key, or a new outbound session from its bundle
    /// (whose signature is checked). Save the keys afterwards (the sessions advanced).
    ///
    /// # Errors
    /// No device could be encrypted for (each one's reason is in the message).
    pub fn seal(
        &mut self,
        me: (u64, u32),
        bundles: &[v1::KeyBundle],
        text: &str,
    ) -> Result<Sealed, ClientError> {
        let mut out = Sealed {
            body: Vec::new(),
            devices: Vec::new(),
            skipped: Vec::new(),
        };
        let mut recipients = Vec::new();
        for b in bundles {
            if (b.user_id, b.device_id) == me {
                continue;
            }
            let skip = |why: &str| (b.user_id, b.device_id, why.to_owned());
            if !verify_bundle(b) {
                out.skipped
                    .push(skip("its signed prekey's signature does not verify"));
                continue;
            }
            let spk = b.signed_prekey.as_ref().map(|s| &s.public_key[..]);
            let Some(Ok(identity)) = spk.map(Curve25519PublicKey::from_slice) else {
                out.skipped
                    .push(skip("its signed prekey is not a Curve25519 key"));
                continue;
            };
            let peer_key = identity.to_base64();
            let list = self
                .sessions
                .entry(peer(b.user_id, b.device_id))
                .or_default();
            let fresh = match list.iter().position(|s| s.peer_key == peer_key) {
                Some(i) => {
                    let s = list.remove(i);
                    list.insert(0, s);
                    false
                }
                None => {
                    let Some(otk) = b.one_time_prekey.as_ref() else {
                        out.skipped
                            .push(skip("no one-time prekey left to start a session"));
                        continue;
                    };
                    let Ok(otk) = Curve25519PublicKey::from_slice(&otk.public_key) else {
                        out.skipped
                            .push(skip("its one-time prekey is not a Curve25519 key"));
                        continue;
                    };
                    match self.account.create_outbound_session(
                        SessionConfig::version_1(),
                        identity,
                        otk,
                    ) {
                        Ok(session) => list.insert(0, PeerSession { peer_key, session }),
                        Err(e) => {
                            out.skipped.push(skip(&format!("no session: {e}")));
                            continue;
                        }
                    }
                    true
                }
            };
            let inner = Plaintext {
                v: VERSION,
                content_type: "text/plain".into(),
                text: text.into(),
                sender_user_id: me.0,
                sender_device_id: me.1,
                recipient_user_id: b.user_id,
                recipient_device_id: b.device_id,
            };
            let inner = serde_json::to_vec(&inner).unwrap_or_default();
            let msg = list[0]
                .session
                .encrypt(inner)
                .map_err(|e| ClientError::InvalidArgument(format!("Olm encryption: {e}")))?;
            let (kind, bytes) = msg.to_parts();
            recipients.push(Entry {
                user_id: b.user_id,
                device_id: b.device_id,
                kind: u8::try_from(kind).unwrap_or(u8::MAX),
                body: base64_encode(bytes),
            });
            out.devices.push((b.user_id, b.device_id, fresh));
        }
        if recipients.is_empty() {
            let why: Vec<String> = out
                .skipped
                .iter()
                .map(|(u, d, w)| format!("device {d} of user {u}: {w}"))
                .collect();
            return Err(ClientError::InvalidArgument(format!(
                "no device to encrypt for{}{}",
                if why.is_empty() { "" } else { ": " },
                why.join("; ")
            )));
        }
        out.body = serde_json::to_vec(&Container {
            v: VERSION,
            sender_key: self.account.curve25519_key().to_base64(),
            recipients,
        })
        .unwrap_or_default();
        self.sealing.insert(digest(&out.body), text.to_owned());
        Ok(out)
    }

    /// Keeps the plaintext of a message this device sent (its own entry is not in the
    /// container), so it reads back in `history`.
    pub fn remember_sent(&mut self, conversation_id: u64, seq: u64, text: &str) {
        self.plaintexts
            .insert(format!("{conversation_id}:{seq}"), text.to_owned());
    }

    /// Forgets the plaintext of sealed container `body` kept until it is acknowledged (call
    /// once it was, or will not be, sent).
    pub fn sealed_done(&mut self, body: &[u8]) {
        self.sealing.remove(&digest(body));
    }

    /// Opens message `m` for device `me` (user, device): a plaintext read before, or this
    /// device's entry (a pre-key message starts an inbound session and uses up the account's
    /// one-time key). Save the keys afterwards. Never panics on a bad body.
    pub fn open(&mut self, me: (u64, u32), m: &v1::Message) -> Opened {
        if m.content_type != CONTENT_TYPE {
            return Opened::NotEncrypted;
        }
        if let Some(t) = self.plaintexts.get(&plaintext_key(m)) {
            return Opened::Text(t.clone());
        }
        // This device's own copy, delivered back before the sender kept it by seq.
        if (m.sender_user_id, m.sender_device_id) == me
            && let Some(t) = self.sealing.get(&digest(&m.body))
        {
            let t = t.clone();
            self.plaintexts.insert(plaintext_key(m), t.clone());
            return Opened::Text(t);
        }
        match self.open_entry(me, m) {
            Ok(text) => {
                self.plaintexts.insert(plaintext_key(m), text.clone());
                Opened::Text(text)
            }
            Err(why) => Opened::Undecryptable(why),
        }
    }

    fn open_entry(&mut self, me: (u64, u32), m: &v1::Message) -> Result<String, String> {
        let c: Container =
            serde_json::from_slice(&m.body).map_err(|e| format!("not a container: {e}"))?;
        if c.v != VERSION {
            return Err(format!("container version {} is not known here", c.v));
        }
        let e = c
            .recipients
            .iter()
            .find(|e| (e.user_id, e.device_id) == me)
            .ok_or("not encrypted for this device")?;
        let sender = Curve25519PublicKey::from_base64(&c.sender_key)
            .map_err(|e| format!("bad sender key: {e}"))?;
        let bytes = base64_decode(&e.body).map_err(|e| format!("bad base64: {e}"))?;
        let msg = OlmMessage::from_parts(usize::from(e.kind), &bytes)
            .map_err(|e| format!("not an Olm message: {e}"))?;
        let peer_key = sender.to_base64();
        let list = self
            .sessions
            .entry(peer(m.sender_user_id, m.sender_device_id))
            .or_default();
        let mut plain = None;
        for i in 0..list.len() {
            if list[i].peer_key != peer_key {
                continue;
            }
            if let OlmMessage::PreKey(p) = &msg
                && p.session_keys() != list[i].session.session_keys()
            {
                continue;
            }
            if let Ok(p) = list[i].session.decrypt(&msg) {
                let s = list.remove(i);
                list.insert(0, s);
                plain = Some(p);
                break;
            }
        }
        let plain = match (plain, &msg) {
            (Some(p), _) => p,
            (None, OlmMessage::PreKey(pre)) => {
                let r = self
                    .account
                    .create_inbound_session(SessionConfig::version_1(), sender, pre)
                    .map_err(|e| format!("no inbound session: {e}"))?;
                list.insert(
                    0,
                    PeerSession {
                        peer_key,
                        session: r.session,
                    },
                );
                r.plaintext
            }
            (None, OlmMessage::Normal(_)) => {
                return Err("no session with the sender decrypts it".into());
            }
        };
        let p: Plaintext =
            serde_json::from_slice(&plain).map_err(|e| format!("bad plaintext: {e}"))?;
        if (p.sender_user_id, p.sender_device_id) != (m.sender_user_id, m.sender_device_id)
            || (p.recipient_user_id, p.recipient_device_id) != me
        {
            return Err("the plaintext names another sender or recipient".into());
        }
        Ok(p.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(k: &mut DeviceKeys, user: u64, device: u32, with_otk: bool) -> v1::KeyBundle {
        let up = k.next_upload(u32::from(with_otk)).unwrap();
        k.published();
        let (identity_key, signed_prekey) = if up.signed_prekey.is_some() {
            (up.identity_key, up.signed_prekey)
        } else {
            let curve = k.curve25519_key();
            (
                k.identity_key().to_vec().into(),
                Some(v1::SignedPrekey {
                    key_id: 1,
                    public_key: curve.to_vec().into(),
                    signature: k.account.sign(curve).to_bytes().to_vec().into(),
                }),
            )
        };
        v1::KeyBundle {
            user_id: user,
            device_id: device,
            identity_key,
            signed_prekey,
            one_time_prekey: up.one_time_prekeys.into_iter().next(),
            ..Default::default()
        }
    }

    fn message(body: Vec<u8>, seq: u64, from: (u64, u32)) -> v1::Message {
        v1::Message {
            conversation_id: 9,
            seq,
            sender_user_id: from.0,
            sender_device_id: from.1,
            content_type: CONTENT_TYPE.into(),
            body: body.into(),
            ..Default::default()
        }
    }

    #[test]
    fn pre_key_then_normal_messages_open_once_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = ((1, 1), (2, 1));
        let mut ka = DeviceKeys::generate().unwrap();
        let mut kb = DeviceKeys::generate().unwrap();
        let bb = bundle(&mut kb, b.0, b.1, true);
        assert_eq!(kb.one_time_count(), 1);
        let s1 = ka.seal(a, std::slice::from_ref(&bb), "hello").unwrap();
        assert_eq!(s1.devices, vec![(2, 1, true)]);
        assert!(!String::from_utf8_lossy(&s1.body).contains("hello"));
        let m1 = message(s1.body, 1, a);
        assert_eq!(kb.open(b, &m1), Opened::Text("hello".into()));
        assert_eq!(kb.one_time_count(), 0, "the used one-time key is removed");
        kb.save(dir.path()).unwrap();
        let mut kb = DeviceKeys::load_or_generate(dir.path()).unwrap();
        // Read again (history after sync): from the kept plaintext.
        assert_eq!(kb.open(b, &m1), Opened::Text("hello".into()));
        // The bundle without a one-time key: the stored session is reused.
        let mut again = bb.clone();
        again.one_time_prekey = None;
        let s2 = ka.seal(a, &[again], "second").unwrap();
        assert_eq!(s2.devices, vec![(2, 1, false)]);
        let mut body = s2.body.clone();
        let m2 = message(body.clone(), 2, a);
        assert_eq!(kb.open(b, &m2), Opened::Text("second".into()));
        // Tampered: one ciphertext character changed.
        let s3 = ka.seal(a, std::slice::from_ref(&bb), "third").unwrap();
        body.clone_from(&s3.body);
        let text = String::from_utf8(body).unwrap();
        let at = text.find("\"body\":\"").unwrap() + 20;
        let mut bytes = text.into_bytes();
        bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
        let opened = kb.open(b, &message(bytes, 3, a));
        assert!(matches!(opened, Opened::Undecryptable(_)), "{opened:?}");
        // Not for this device, not a container, another sender claiming it.
        let m2_copy = message(m2.body.to_vec(), 10, a);
        assert!(matches!(
            kb.open((3, 1), &m2_copy),
            Opened::Undecryptable(_)
        ));
        assert!(matches!(
            kb.open(b, &message(b"{".to_vec(), 4, a)),
            Opened::Undecryptable(_)
        ));
        let s4 = ka.seal(a, std::slice::from_ref(&bb), "fourth").unwrap();
        assert!(matches!(
            kb.open(b, &message(s4.body, 5, (7, 1))),
            Opened::Undecryptable(_)
        ));
        let plain = v1::Message {
            content_type: "text/plain".into(),
            ..Default::default()
        };
        assert_eq!(kb.open(b, &plain), Opened::NotEncrypted);
    }

    fn listed(b: &v1::KeyBundle) -> v1::KeyBundle {
        let mut l = b.clone();
        l.one_time_prekey = None;
        l
    }

    /// A listing names the devices without a session of their listed key (never `me`),
    /// forgets the sessions of devices no longer listed or whose key changed, and leaves other
    /// users' sessions alone; an empty listing forgets nothing; a forged bundle lists nothing.
    #[test]
    fn a_listing_keeps_the_sessions_of_listed_keys_and_names_the_devices_without_one() {
        let me = (1, 1);
        let mut ka = DeviceKeys::generate().unwrap();
        let (mut kb1, mut kb2, mut kc) = (
            DeviceKeys::generate().unwrap(),
            DeviceKeys::generate().unwrap(),
            DeviceKeys::generate().unwrap(),
        );
        let (b1, b2, c1) = (
            bundle(&mut kb1, 2, 1, true),
            bundle(&mut kb2, 2, 2, true),
            bundle(&mut kc, 3, 1, true),
        );
        assert_eq!(ka.reconcile(me, 2, &[listed(&b1), listed(&b2)]), [1, 2]);
        ka.seal(me, &[b1.clone(), b2.clone(), c1.clone()], "x")
            .unwrap();
        assert!(ka.reconcile(me, 2, &[listed(&b1), listed(&b2)]).is_empty());
        assert!(ka.reconcile(me, 2, &[]).is_empty());
        assert_eq!(ka.session_devices(), [(2, 1), (2, 2), (3, 1)]);
        // Device 2 removed: its session goes, user 3's stays.
        assert!(ka.reconcile(me, 2, &[listed(&b1)]).is_empty());
        assert_eq!(ka.session_devices(), [(2, 1), (3, 1)]);
        // Device 1 started over with a new key: its old session goes, it is named.
        let b1_new = bundle(&mut DeviceKeys::generate().unwrap(), 2, 1, true);
        assert_eq!(ka.reconcile(me, 2, &[listed(&b1_new)]), [1]);
        assert_eq!(ka.session_devices(), [(3, 1)]);
        // A bundle whose signature does not verify is not a listing of its device.
        let mut forged = listed(&b2);
        forged.signed_prekey.as_mut().unwrap().public_key = vec![1; 32].into();
        assert!(ka.reconcile(me, 2, &[forged]).is_empty());
        // This device is never named.
        assert!(ka.reconcile((3, 1), 3, &[listed(&c1)]).is_empty());
    }

    /// The sender's own copy, delivered back before the ack was handled, opens from the
    /// container sealed; once done with, it does not.
    #[test]
    fn the_own_copy_opens_while_it_is_being_sent() {
        let a = (1, 1);
        let mut ka = DeviceKeys::generate().unwrap();
        let bb = bundle(&mut DeviceKeys::generate().unwrap(), 2, 1, true);
        let s = ka.seal(a, &[bb], "mine").unwrap();
        assert_eq!(
            ka.open(a, &message(s.body.clone(), 1, a)),
            Opened::Text("mine".into())
        );
        ka.sealed_done(&s.body);
        assert!(matches!(
            ka.open(a, &message(s.body, 2, a)),
            Opened::Undecryptable(_)
        ));
    }

    #[test]
    fn bad_bundles_are_skipped_and_none_left_is_an_error() {
        let mut ka = DeviceKeys::generate().unwrap();
        let mut kb = DeviceKeys::generate().unwrap();
        let mut forged = bundle(&mut kb, 2, 1, true);
        forged.signed_prekey.as_mut().unwrap().public_key = vec![1; 32].into();
        let no_otk = bundle(&mut DeviceKeys::generate().unwrap(), 2, 2, false);
        let err = ka.seal((1, 1), &[forged, no_otk], "x").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("signature does not verify"), "{text}");
        assert!(text.contains("no one-time prekey"), "{text}");
    }
}
