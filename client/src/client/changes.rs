//! Replies, edits, deletes for everyone and reactions (protocol/README.md, "Edits, deletes,
//! reactions and replies"), and the disappearing-messages timer ("Disappearing messages and
//! retention"). Each goes through the outbox like a message: durable on this
//! device before it is sent, retried with the same `client_msg_id` until the server answers,
//! and acknowledged with the `SendAck` of its own entry in the conversation.

use starling_protocol::v1;

use super::Client;
use crate::clock::unix_ms;
use crate::error::ClientError;
use crate::ids::ClientMsgId;
use crate::store::{OutboxEntry, Target};

/// The longest reaction the server accepts, in bytes of UTF-8.
const EMOJI_BYTES_MAX: usize = 64;

impl Client {
    /// Sends `text` as a reply to message `reply_to_seq` of the conversation `to` names.
    pub async fn reply(
        &self,
        to: Target,
        reply_to_seq: u64,
        text: &str,
    ) -> Result<v1::SendAck, ClientError> {
        if reply_to_seq == 0 {
            return Err(ClientError::InvalidArgument(
                "reply_to_seq must be a message's seq, not 0".into(),
            ));
        }
        let mut e = entry(to, "text/plain", text.as_bytes().to_vec())?;
        e.reply_to_seq = reply_to_seq;
        self.queue(e).await
    }

    /// Replaces the text of our message `seq` of `conversation_id` (within the server's edit
    /// window).
    pub async fn edit(
        &self,
        conversation_id: u64,
        seq: u64,
        text: &str,
    ) -> Result<v1::SendAck, ClientError> {
        let body = text.as_bytes().to_vec();
        self.change(conversation_id, v1::ChangeKind::Edit, seq, "", body)
            .await
    }

    /// Deletes message `seq` of `conversation_id` for everyone (ours within the server's delete
    /// window; anyone's in a group we administer).
    pub async fn delete_for_everyone(
        &self,
        conversation_id: u64,
        seq: u64,
    ) -> Result<v1::SendAck, ClientError> {
        self.change(conversation_id, v1::ChangeKind::Delete, seq, "", Vec::new())
            .await
    }

    /// Sets our reaction to message `seq` of `conversation_id` to `emoji` (replacing any earlier
    /// one of ours), or removes it when `emoji` is empty.
    pub async fn react(
        &self,
        conversation_id: u64,
        seq: u64,
        emoji: &str,
    ) -> Result<v1::SendAck, ClientError> {
        if emoji.len() > EMOJI_BYTES_MAX {
            return Err(ClientError::InvalidArgument(format!(
                "a reaction is at most {EMOJI_BYTES_MAX} bytes, this one {}",
                emoji.len()
            )));
        }
        self.change(
            conversation_id,
            v1::ChangeKind::React,
            seq,
            emoji,
            Vec::new(),
        )
        .await
    }

    /// Sets the disappearing-messages timer of `conversation_id` to `seconds` (0: off): every
    /// message sent into it afterwards disappears `seconds` after the server accepted it
    /// (`Message.expires_at_ms`). Any member of a 1:1 conversation; in a group, any member who
    /// may send. `seconds` is 0 or from 5 to 31,536,000 (one year).
    pub async fn set_disappearing_timer(
        &self,
        conversation_id: u64,
        seconds: u64,
    ) -> Result<v1::SendAck, ClientError> {
        use starling_protocol::limits::{DISAPPEARING_TIMER_SECS_MAX, DISAPPEARING_TIMER_SECS_MIN};
        if conversation_id == 0 {
            return Err(ClientError::InvalidArgument(
                "name a conversation: its id is not 0".into(),
            ));
        }
        if seconds != 0
            && !(DISAPPEARING_TIMER_SECS_MIN..=DISAPPEARING_TIMER_SECS_MAX).contains(&seconds)
        {
            return Err(ClientError::InvalidArgument(format!(
                "a disappearing timer is 0 (off) or from {DISAPPEARING_TIMER_SECS_MIN} to \
                 {DISAPPEARING_TIMER_SECS_MAX} seconds, not {seconds}"
            )));
        }
        let mut e = entry(Target::Conversation(conversation_id), "", Vec::new())?;
        e.set_timer = Some(seconds);
        self.queue(e).await
    }

    async fn change(
        &self,
        conversation_id: u64,
        kind: v1::ChangeKind,
        target_seq: u64,
        emoji: &str,
        body: Vec<u8>,
    ) -> Result<v1::SendAck, ClientError> {
        if conversation_id == 0 || target_seq == 0 {
            return Err(ClientError::InvalidArgument(
                "name a message: a conversation id and a seq, neither 0".into(),
            ));
        }
        let content_type = if kind == v1::ChangeKind::Edit {
            "text/plain"
        } else {
            ""
        };
        let mut e = entry(Target::Conversation(conversation_id), content_type, body)?;
        e.change = prost::Message::encode_to_vec(&v1::MessageChange {
            kind: kind as i32,
            target_seq,
            emoji: emoji.to_owned(),
        });
        self.queue(e).await
    }
}

fn entry(to: Target, content_type: &str, body: Vec<u8>) -> Result<OutboxEntry, ClientError> {
    let client_msg_id = ClientMsgId::random()
        .map_err(|_| ClientError::InvalidArgument("no randomness for client_msg_id".into()))?;
    Ok(OutboxEntry {
        client_msg_id,
        to,
        content_type: content_type.to_owned(),
        body,
        queued_at_ms: unix_ms(),
        media: Vec::new(),
        reply_to_seq: 0,
        change: Vec::new(),
        set_timer: None,
    })
}
