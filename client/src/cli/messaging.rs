//! One-shot commands: server info, the outbox, send, history, sync, watch.

use std::time::Duration;

use serde_json::{Value, json};
use starling_client::{
    Client, ClientError, Event, Events, HistoryAnchor, Profile, Target, json as sj, v1,
};

use super::out::Out;

/// What `server-info` prints: the Welcome of an unauthenticated connection.
pub(crate) fn server_info(w: &v1::Welcome) -> Value {
    let l = w.limits.unwrap_or_default();
    json!({
        "type": "server",
        "server_version": w.server_version,
        "protocol_version": w.protocol_version,
        "features": w.features,
        "frame_bytes_max": l.frame_bytes_max,
        "body_bytes_max": l.body_bytes_max,
        "inflight_requests_max": l.inflight_requests_max,
        "heartbeat_ms": l.heartbeat_ms,
        "idle_timeout_ms": l.idle_timeout_ms,
        "sync_messages_max": l.sync_messages_max,
    })
}

pub(crate) fn outbox(out: &Out, profile: &Profile, clear: bool) -> Result<(), ClientError> {
    let mut ob = profile.outbox()?;
    if clear {
        let n = ob.clear()?;
        out.print(&json!({ "type": "outbox_cleared", "removed": n }));
        return Ok(());
    }
    for e in ob.entries() {
        let to = match e.to {
            Target::User(u) => json!({ "user_id": u }),
            Target::Conversation(c) => json!({ "conversation_id": c }),
        };
        out.print(&json!({
            "type": "queued",
            "client_msg_id": e.client_msg_id.to_string(),
            "to": to,
            "content_type": e.content_type,
            "bytes": e.body.len(),
            "queued_at_ms": e.queued_at_ms,
        }));
    }
    Ok(())
}

/// Resolves a list of user ids and +phones.
pub(crate) async fn users(client: &Client, list: &[String]) -> Result<Vec<u64>, ClientError> {
    let mut out = Vec::with_capacity(list.len());
    for who in list.iter().map(|w| w.trim()).filter(|w| !w.is_empty()) {
        out.push(client.resolve_user(who).await?);
    }
    Ok(out)
}

/// `conv:N` or `group:N` → conversation N; anything else is a user.
pub(crate) async fn target(client: &Client, who: &str) -> Result<Target, ClientError> {
    if let Some(c) = who
        .strip_prefix("conv:")
        .or_else(|| who.strip_prefix("group:"))
    {
        return c
            .parse()
            .map(Target::Conversation)
            .map_err(|_| ClientError::InvalidArgument(format!("bad conversation id in {who:?}")));
    }
    Ok(Target::User(client.resolve_user(who).await?))
}

pub(crate) async fn conversation(client: &Client, who: &str) -> Result<u64, ClientError> {
    match target(client, who).await? {
        Target::Conversation(c) => Ok(c),
        Target::User(u) => client.conversation_with(u).await?.ok_or_else(|| {
            ClientError::InvalidArgument(format!("no conversation with user {u} yet"))
        }),
    }
}

pub(crate) async fn send(
    client: &Client,
    to: &str,
    text: &str,
    reply_to: Option<u64>,
    wait: Duration,
) -> Result<v1::SendAck, ClientError> {
    let to = target(client, to).await?;
    let sent = async {
        match reply_to {
            Some(seq) => client.reply(to, seq, text).await,
            None => client.send_text(to, text).await,
        }
    };
    tokio::time::timeout(wait, sent)
        .await
        .map_err(|_| ClientError::Timeout {
            what: "SendAck (the message stays in the outbox and will be retried)",
            after: wait,
        })?
}

/// What `edit`, `delete` and `react` do to a message.
pub(crate) enum Change<'a> {
    /// New text.
    Edit(&'a str),
    /// Delete for everyone.
    Delete,
    /// Set (or, empty, remove) our reaction.
    React(&'a str),
}

/// Edits, deletes or reacts to message `seq` of the conversation `with` names.
pub(crate) async fn change(
    client: &Client,
    with: &str,
    seq: u64,
    what: Change<'_>,
    wait: Duration,
) -> Result<v1::SendAck, ClientError> {
    let conv = conversation(client, with).await?;
    let sent = async {
        match what {
            Change::Edit(text) => client.edit(conv, seq, text).await,
            Change::Delete => client.delete_for_everyone(conv, seq).await,
            Change::React(emoji) => client.react(conv, seq, emoji).await,
        }
    };
    tokio::time::timeout(wait, sent)
        .await
        .map_err(|_| ClientError::Timeout {
            what: "SendAck (the change stays in the outbox and will be retried)",
            after: wait,
        })?
}

/// Sets the disappearing-messages timer of the conversation `with` names (0: off).
pub(crate) async fn set_timer(
    client: &Client,
    with: &str,
    seconds: u64,
    wait: Duration,
) -> Result<v1::SendAck, ClientError> {
    let conv = conversation(client, with).await?;
    tokio::time::timeout(wait, client.set_disappearing_timer(conv, seconds))
        .await
        .map_err(|_| ClientError::Timeout {
            what: "SendAck (the timer change stays in the outbox and will be retried)",
            after: wait,
        })?
}

pub(crate) async fn history(
    out: &Out,
    client: &Client,
    reader: &mut super::e2e::Reader,
    with: &str,
    limit: u32,
    before: Option<u64>,
) -> Result<(), ClientError> {
    let conv = conversation(client, with).await?;
    let anchor = before.map_or(HistoryAnchor::Latest, HistoryAnchor::Before);
    let page = client.history(conv, anchor, limit).await?;
    for m in &page.messages {
        let mut v = reader.message(m)?;
        if m.reply_to_seq != 0 {
            // The reply's quote: the message it answers, as it is now.
            let quoted = match page.messages.iter().find(|q| q.seq == m.reply_to_seq) {
                Some(q) => Some(q.clone()),
                None => client
                    .history(conv, HistoryAnchor::After(m.reply_to_seq - 1), 1)
                    .await?
                    .messages
                    .into_iter()
                    .find(|q| q.seq == m.reply_to_seq),
            };
            if let Some(q) = quoted {
                let q = reader.message(&q)?;
                v["reply_quote"] = if q["deleted"] == true {
                    json!("[deleted for everyone]")
                } else {
                    q.get("text").cloned().unwrap_or(json!("[not text]"))
                };
            }
        }
        out.print(&v);
    }
    out.print(
        &json!({ "type": "history_end", "conversation_id": conv, "has_more": page.has_more }),
    );
    Ok(())
}

/// Prints events until `Synced`; a refused Sync or a lost session is an
/// error.
pub(crate) async fn sync(
    out: &Out,
    reader: &mut super::e2e::Reader,
    mut events: Events,
    wait: Duration,
) -> Result<(), ClientError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut last_disconnect = None;
    loop {
        let ev = tokio::time::timeout_at(deadline, events.next())
            .await
            .map_err(|_| match last_disconnect.take() {
                Some(reason) => ClientError::Closed(reason),
                None => ClientError::Timeout {
                    what: "end of the sync",
                    after: wait,
                },
            })?;
        match ev {
            None => return Err(ClientError::Stopped),
            Some(Event::SyncFailed(e)) => return Err(ClientError::Server(e)),
            Some(Event::LoggedOut { reason }) => return Err(ClientError::SessionLost(reason)),
            Some(ev @ Event::Synced { .. }) => {
                out.print(&sj::event(&ev));
                return Ok(());
            }
            Some(Event::Disconnected { reason, .. }) => last_disconnect = Some(reason),
            Some(Event::Connected { .. }) => {}
            Some(ev) => out.print(&reader.event(&ev)?),
        }
    }
}

pub(crate) async fn watch(
    out: &Out,
    reader: &mut super::e2e::Reader,
    mut events: Events,
    for_: Duration,
) -> Result<(), ClientError> {
    let deadline = tokio::time::Instant::now() + for_;
    while let Ok(ev) = tokio::time::timeout_at(deadline, events.next()).await {
        let Some(ev) = ev else {
            return Err(ClientError::Stopped);
        };
        out.print(&reader.event(&ev)?);
        if let Event::LoggedOut { reason } = ev {
            return Err(ClientError::SessionLost(reason));
        }
    }
    Ok(())
}
