//! `chat`: the conversation live (messages, receipts, who is typing), each
//! stdin line sent, and typing indicators while a line is being written.
//!
//! stdin is read as it arrives, not by lines: from a pipe or a terminal in
//! non-canonical mode, the first bytes of a line announce `TYPING`
//! (rate-limited by [`TypingNotifier`]) and the line's end sends the message
//! and `STOPPED`. A terminal in its usual line mode hands over whole lines,
//! so there the indicator only flashes as the line is sent.

use std::io::Read as _;
use std::time::Duration;

use starling_client::{Client, ClientError, Event, Events, Target, TypingNotifier, json as sj, v1};

use super::messaging::target;
use super::out::{Out, print_error};

/// Bytes of a line being typed at most; a longer one is sent as it is.
const LINE_BYTES_MAX: usize = 64 * 1024;

pub(crate) async fn chat(
    out: &Out,
    client: &Client,
    reader: &mut super::e2e::Reader,
    mut events: Events,
    with: &str,
    wait: Duration,
) -> Result<(), ClientError> {
    let to = target(client, with).await?;
    let (peer, mut conv) = match to {
        Target::Conversation(c) => (None, Some(c)),
        Target::User(u) => (Some(u), client.conversation_with(u).await.ok().flatten()),
    };
    // stdin is read on a plain thread (the runtime has no io-std).
    let (chunk_tx, mut chunks) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if chunk_tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let (result_tx, mut results) = tokio::sync::mpsc::channel(16);
    let mut stdin_open = true;
    let mut sending = 0usize;
    let mut line: Vec<u8> = Vec::new();
    let mut typing = TypingNotifier::default();
    loop {
        tokio::select! {
            chunk = chunks.recv(), if stdin_open => {
                let mut complete = Vec::new();
                match chunk {
                    Some(bytes) => {
                        for b in bytes {
                            if b == b'\n' || line.len() >= LINE_BYTES_MAX {
                                complete.push(std::mem::take(&mut line));
                            }
                            if b != b'\n' {
                                line.push(b);
                            }
                        }
                    }
                    None => {
                        stdin_open = false;
                        complete.push(std::mem::take(&mut line));
                    }
                }
                let typed = line.iter().any(|b| !b.is_ascii_whitespace());
                for text in complete {
                    let text = String::from_utf8_lossy(&text).trim_end_matches('\r').to_owned();
                    if let (Some(c), Some(state)) = (conv, typing.handle_stop()) {
                        indicate(client, c, state).await;
                    }
                    if text.trim().is_empty() {
                        continue;
                    }
                    let client = client.clone();
                    let tx = result_tx.clone();
                    sending += 1;
                    tokio::spawn(async move {
                        let res = tokio::time::timeout(wait, client.send_text(to, &text)).await;
                        let _ = tx.send(res).await;
                    });
                }
                if typed
                    && let (Some(c), Some(state)) =
                        (conv, typing.handle_input(tokio::time::Instant::now()))
                {
                    indicate(client, c, state).await;
                }
            },
            Some(res) = results.recv() => {
                sending -= 1;
                match res {
                    Ok(Ok(ack)) => {
                        conv.get_or_insert(ack.conversation_id);
                        out.print(&sj::send_ack(&ack));
                    }
                    Ok(Err(e)) => print_error(out, &e),
                    Err(_) => print_error(out, &ClientError::Timeout { what: "SendAck (kept in the outbox)", after: wait }),
                }
            }
            ev = events.next() => {
                let Some(ev) = ev else { return Err(ClientError::Stopped) };
                let show = match &ev {
                    Event::Message(m) => {
                        if conv.is_none() && peer == Some(m.sender_user_id) {
                            conv = Some(m.conversation_id);
                        }
                        conv == Some(m.conversation_id)
                    }
                    Event::MessageChanged(m) => conv == Some(m.conversation_id),
                    Event::Receipt(r) => conv == Some(r.conversation_id),
                    Event::Typing(t) => conv == Some(t.conversation_id),
                    Event::GroupChanged { conversation_id, .. } => conv == Some(*conversation_id),
                    Event::Sent(_) | Event::Connected { .. } | Event::Presence(_) => false,
                    _ => true,
                };
                if show {
                    out.print(&reader.event(&ev)?);
                }
                match ev {
                    Event::LoggedOut { reason } => return Err(ClientError::SessionLost(reason)),
                    Event::SyncFailed(e) => return Err(ClientError::Server(e)),
                    _ => {}
                }
            }
        }
        if !stdin_open && sending == 0 {
            return Ok(());
        }
    }
}

/// Sends a typing indicator; failing to is not worth interrupting the chat
/// (the indicator is best effort, and the server lets it expire).
async fn indicate(client: &Client, conversation_id: u64, state: v1::TypingState) {
    let _ = client.typing(conversation_id, state).await;
}
