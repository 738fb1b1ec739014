//! One connection's TLS: rustls's unbuffered server API driven by hand. Ciphertext is read into
//! the shard's scratch buffer and decrypted in place; records go out through the connection's
//! `wire` buffer, which exists only while bytes wait for the socket. An idle connection keeps
//! rustls's record-layer keys and state machine, and nothing else.

use std::sync::Arc;

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, UnbufferedStatus, WriteTraffic,
};

/// TLS 1.3 bytes added per record: 5 header + 1 inner content type + 16 tag.
const TLS_RECORD_OVERHEAD: usize = 22;
/// Largest TLS plaintext fragment.
pub(crate) const TLS_FRAGMENT_BYTES: usize = 16 * 1024;
/// Most plaintext encrypted in one go (bounds the ciphertext allocation per
/// write burst).
pub(crate) const TLS_ENCRYPT_CHUNK_BYTES: usize = 4 * TLS_FRAGMENT_BYTES;
/// Largest TLS 1.3 ciphertext record (header + 2^14 + 256).
pub const TLS_RECORD_BYTES_MAX: usize = 5 + TLS_FRAGMENT_BYTES + 256;

/// One connection's TLS: rustls's unbuffered server connection (handshake
/// state, record-layer keys, sequence numbers) and a partial-record tail.
/// Ciphertext is read into the shard's scratch buffer and decrypted there;
/// outgoing records go straight into the connection's `wire` buffer.
pub struct Tls {
    conn: UnbufferedServerConnection,
    /// The tail of the last read that did not make a whole record (rustls
    /// wants it in front of the next bytes). Unallocated when empty.
    partial_in: Vec<u8>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("handshaking", &self.is_handshaking())
            .field("partial_in", &self.partial_in.len())
            .finish_non_exhaustive()
    }
}

/// What feeding ciphertext to rustls found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fed {
    /// The connection goes on.
    Open,
    /// The peer sent close_notify.
    PeerClosed,
}

impl Tls {
    /// A server connection for `cfg`.
    pub fn new(cfg: Arc<rustls::ServerConfig>) -> Result<Self, rustls::Error> {
        Ok(Self {
            conn: UnbufferedServerConnection::new(cfg)?,
            partial_in: Vec::new(),
        })
    }

    /// Still in the handshake.
    #[must_use]
    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// The handshake resumed a session from a ticket.
    #[must_use]
    pub fn resumed(&self) -> bool {
        self.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
    }

    /// Bytes of a partial record kept from the last read.
    #[must_use]
    pub fn partial_in(&self) -> &[u8] {
        &self.partial_in
    }

    /// Processes `incoming` (the kept partial record followed by newly read
    /// bytes; decrypted in place), hands the plaintext to `app`, appends
    /// rustls's own records (handshake flights, tickets, alerts) to `wire`,
    /// and keeps an incomplete trailing record for the next call. On an
    /// error the alert rustls prepared is appended to `wire`.
    pub fn feed(
        &mut self,
        incoming: &mut [u8],
        wire: &mut Vec<u8>,
        mut app: impl FnMut(&[u8]),
    ) -> Result<Fed, rustls::Error> {
        let mut used = 0;
        let fed = loop {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut incoming[used..]);
            let step = match state {
                Ok(ConnectionState::ReadTraffic(mut r)) => {
                    let mut step = Ok(None);
                    while let Some(rec) = r.next_record() {
                        match rec {
                            Ok(rec) => app(rec.payload),
                            Err(e) => {
                                step = Err(e);
                                break;
                            }
                        }
                    }
                    step
                }
                Ok(ConnectionState::EncodeTlsData(mut e)) => {
                    encode(&mut e, wire);
                    Ok(None)
                }
                Ok(ConnectionState::TransmitTlsData(t)) => {
                    // Sent when the caller flushes `wire`.
                    t.done();
                    Ok(None)
                }
                Ok(ConnectionState::BlockedHandshake | ConnectionState::WriteTraffic(_)) => {
                    Ok(Some(Fed::Open))
                }
                Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                    Ok(Some(Fed::PeerClosed))
                }
                // Early data is not enabled; nothing else is expected.
                Ok(_) => Err(rustls::Error::General("unexpected TLS state".into())),
                Err(e) => Err(e),
            };
            used += discard;
            match step {
                Ok(None) => {}
                Ok(Some(fed)) => break fed,
                Err(e) => {
                    self.take_alert(wire);
                    return Err(e);
                }
            }
        };
        self.partial_in = if fed == Fed::Open && used < incoming.len() {
            incoming[used..].to_vec()
        } else {
            Vec::new()
        };
        Ok(fed)
    }

    /// After an error: appends the alert rustls queued to `wire`.
    fn take_alert(&mut self, wire: &mut Vec<u8>) {
        for _ in 0..4 {
            match self.conn.process_tls_records(&mut []).state {
                Ok(ConnectionState::EncodeTlsData(mut e)) => encode(&mut e, wire),
                Ok(ConnectionState::TransmitTlsData(t)) => t.done(),
                _ => return,
            }
        }
    }

    /// Encrypts `plain` into records appended to `wire`. False if the
    /// connection cannot send application data (handshaking, closed, keys
    /// exhausted).
    pub fn encrypt(&mut self, plain: &[u8], wire: &mut Vec<u8>) -> bool {
        let records = plain.len().div_ceil(TLS_FRAGMENT_BYTES).max(1);
        let estimate = plain.len() + records * TLS_RECORD_OVERHEAD;
        self.write_records(wire, estimate, |w, out| w.encrypt(plain, out))
    }

    /// Appends a close_notify alert to `wire` (if the handshake finished).
    pub fn close_notify(&mut self, wire: &mut Vec<u8>) {
        self.write_records(wire, 64, |w, out| w.queue_close_notify(out));
    }

    fn write_records(
        &mut self,
        wire: &mut Vec<u8>,
        estimate: usize,
        mut op: impl FnMut(
            &mut WriteTraffic<'_, rustls::server::ServerConnectionData>,
            &mut [u8],
        ) -> Result<usize, EncryptError>,
    ) -> bool {
        for _ in 0..8 {
            match self.conn.process_tls_records(&mut []).state {
                Ok(ConnectionState::EncodeTlsData(mut e)) => encode(&mut e, wire),
                Ok(ConnectionState::TransmitTlsData(t)) => t.done(),
                Ok(ConnectionState::WriteTraffic(mut w)) => {
                    let start = wire.len();
                    let mut need = estimate;
                    loop {
                        wire.resize(start + need, 0);
                        match op(&mut w, &mut wire[start..]) {
                            Ok(n) => {
                                wire.truncate(start + n);
                                return true;
                            }
                            Err(EncryptError::InsufficientSize(s)) if s.required_size > need => {
                                need = s.required_size;
                            }
                            Err(_) => {
                                wire.truncate(start);
                                return false;
                            }
                        }
                    }
                }
                _ => return false,
            }
        }
        false
    }
}

/// Appends one chunk rustls wants sent to `wire`.
fn encode<D>(e: &mut EncodeTlsData<'_, D>, wire: &mut Vec<u8>) {
    let need = match e.encode(&mut []) {
        Err(EncodeError::InsufficientSize(s)) => s.required_size,
        Ok(_) | Err(_) => return,
    };
    let start = wire.len();
    wire.resize(start + need, 0);
    match e.encode(&mut wire[start..]) {
        Ok(n) => wire.truncate(start + n),
        Err(_) => wire.truncate(start),
    }
}
