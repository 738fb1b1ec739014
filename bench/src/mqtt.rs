//! The MQTT 3.1.1 packets the peer driver needs (CONNECT/CONNACK,
//! SUBSCRIBE/SUBACK, PUBLISH at QoS 1, PUBACK), hand-written.
//!
//! Why not an MQTT crate: the peer driver must go through the same
//! scheduling, batching and histogram code as the Starling driver — one
//! single-threaded task per pair, every due message encoded into one buffer
//! and written with one syscall. rumqttc (the maintained choice) runs its
//! own event loop per client behind a request channel and owns the socket
//! and the packet-id allocation, so we could not batch writes or see a
//! PUBACK's packet id without its queues in the measurement, and it adds a
//! second TLS stack configuration. These seven packet types are ~150 lines.

use anyhow::bail;
use bytes::{BufMut as _, BytesMut};

fn put_remaining_length(buf: &mut BytesMut, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        buf.put_u8(b);
        if n == 0 {
            break;
        }
    }
}

fn put_str(buf: &mut BytesMut, s: &str) {
    buf.put_u16(s.len() as u16);
    buf.put_slice(s.as_bytes());
}

/// CONNECT with a clean session and no keep-alive.
pub(crate) fn connect(buf: &mut BytesMut, client_id: &str) {
    let remaining = 10 + 2 + client_id.len();
    buf.put_u8(0x10);
    put_remaining_length(buf, remaining);
    put_str(buf, "MQTT");
    buf.put_u8(4); // protocol level 3.1.1
    buf.put_u8(0x02); // clean session
    buf.put_u16(0); // keep-alive off: runs are bounded and short
    put_str(buf, client_id);
}

/// SUBSCRIBE to one topic filter at QoS 1.
pub(crate) fn subscribe(buf: &mut BytesMut, packet_id: u16, topic: &str) {
    buf.put_u8(0x82);
    put_remaining_length(buf, 2 + 2 + topic.len() + 1);
    buf.put_u16(packet_id);
    put_str(buf, topic);
    buf.put_u8(1);
}

/// PUBLISH at QoS 1.
pub(crate) fn publish_qos1(buf: &mut BytesMut, packet_id: u16, topic: &str, payload: &[u8]) {
    buf.put_u8(0x32);
    put_remaining_length(buf, 2 + topic.len() + 2 + payload.len());
    put_str(buf, topic);
    buf.put_u16(packet_id);
    buf.put_slice(payload);
}

/// PUBACK for a received QoS 1 PUBLISH.
pub(crate) fn puback(buf: &mut BytesMut, packet_id: u16) {
    buf.put_u8(0x40);
    buf.put_u8(2);
    buf.put_u16(packet_id);
}

/// A parsed packet (borrowing the receive buffer).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Packet<'a> {
    ConnAck {
        return_code: u8,
    },
    SubAck {
        packet_id: u16,
        granted: u8,
    },
    Publish {
        qos: u8,
        packet_id: u16,
        topic: &'a [u8],
        payload: &'a [u8],
    },
    PubAck {
        packet_id: u16,
    },
    Other(u8),
}

fn u16_at(b: &[u8], i: usize) -> anyhow::Result<u16> {
    match b.get(i..i + 2) {
        Some(s) => Ok(u16::from_be_bytes([s[0], s[1]])),
        None => bail!("MQTT packet too short"),
    }
}

/// Parses one packet from the front of `buf`: the packet and its length,
/// or `None` if more bytes are needed.
pub(crate) fn parse(buf: &[u8]) -> anyhow::Result<Option<(Packet<'_>, usize)>> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut len = 0usize;
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * (i - 1));
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            bail!("MQTT remaining length longer than 4 bytes");
        }
    }
    let total = i + len;
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[i..total];
    let p = match first >> 4 {
        2 => Packet::ConnAck {
            return_code: *body.get(1).unwrap_or(&255),
        },
        9 => Packet::SubAck {
            packet_id: u16_at(body, 0)?,
            granted: *body.get(2).unwrap_or(&0x80),
        },
        3 => {
            let qos = (first >> 1) & 3;
            let tl = usize::from(u16_at(body, 0)?);
            let topic = body.get(2..2 + tl).unwrap_or_default();
            let mut at = 2 + tl;
            let packet_id = if qos > 0 {
                let id = u16_at(body, at)?;
                at += 2;
                id
            } else {
                0
            };
            Packet::Publish {
                qos,
                packet_id,
                topic,
                payload: body.get(at..).unwrap_or_default(),
            }
        }
        4 => Packet::PubAck {
            packet_id: u16_at(body, 0)?,
        },
        t => Packet::Other(t),
    };
    Ok(Some((p, total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_round_trips_and_splits() {
        let mut b = BytesMut::new();
        publish_qos1(&mut b, 7, "t/1", &[9u8; 200]);
        puback(&mut b, 7);
        let (p, n) = parse(&b).unwrap().unwrap();
        assert_eq!(
            p,
            Packet::Publish {
                qos: 1,
                packet_id: 7,
                topic: b"t/1",
                payload: &[9u8; 200]
            }
        );
        assert_eq!(parse(&b[..n - 1]).unwrap(), None);
        assert_eq!(
            parse(&b[n..]).unwrap().unwrap(),
            (Packet::PubAck { packet_id: 7 }, 4)
        );
    }

    #[test]
    fn connect_matches_the_spec_bytes() {
        let mut b = BytesMut::new();
        connect(&mut b, "a");
        assert_eq!(&b[..], b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x00\x00\x01a");
    }
}
