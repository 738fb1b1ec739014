//! `chat`: the conversation live (messages, receipts, who is typing), each
//! stdin line sent, and typing indicators while a line is being written.
//!
//! stdin is read as it arrives, not by lines: from a pipe or a terminal in
//! non-canonical mode, the first bytes of a line announce `TYPING`
//! (rate-limited by [`TypingNotifier`]) and the line's end sends the message
//! and `STOPPED`. A terminal in its usual line mode hands over whole lines,
//! so there the indicator only flashes as the line is sent.
//!
//! With `--e2e` (a chat with one user) each line is sealed and sent as
//! `send --e2e` does, one line at a time in the order typed (two sends at
//! once could each start a session with the same new device); received
//! end-to-end messages are shown opened, as everywhere in the CLI.

use std::io::Read as _;
use std::time::Duration;

use serde_json::Value;
use starling_client::{Client, ClientError, Event, Events, Target, TypingNotifier, json as sj, v1};
use tokio::sync::mpsc;
use tokio::time::error::Elapsed;

use super::messaging::target;
use super::out::{Out, print_error};

/// Bytes of a line being typed at most; a longer one is sent as it is.
const LINE_BYTES_MAX: usize = 64 * 1024;

/// How a line went: the ack and what to print for it.
type Outcome = Result<Result<(v1::SendAck, Value), ClientError>, Elapsed>;

/// Where typed lines go.
enum Lines {
    /// Each sent in clear on its own task.
    Plain(Target),
    /// To the task that seals and sends them one at a time.
    Sealed(mpsc::UnboundedSender<String>),
}

/// Starts the task that sends `--e2e` lines to user `to`, in order, each within `wait`.
fn sealed_lines(
    client: &Client,
    reader: &mut super::e2e::Reader,
    to: u64,
    wait: Duration,
    results: mpsc::Sender<Outcome>,
) -> Result<Lines, ClientError> {
    let keys = reader.keys_to_send()?;
    let dir = reader.dir().to_path_buf();
    let client = client.clone();
    let (tx, mut lines) = mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Some(text) = lines.recv().await {
            let res = tokio::time::timeout(wait, client.send_encrypted(&keys, &dir, to, &text))
                .await
                .map(|r| r.map(|(ack, sealed)| (ack.clone(), super::e2e::sent(&ack, &sealed))));
            if results.send(res).await.is_err() {
                break;
            }
        }
    });
    Ok(Lines::Sealed(tx))
}

pub(crate) async fn chat(
    out: &Out,
    client: &Client,
    reader: &mut super::e2e::Reader,
    mut events: Events,
    with: &str,
    wait: Duration,
    e2e: bool,
) -> Result<(), ClientError> {
    let to = if e2e {
        Target::User(super::e2e::recipient(client, with).await?)
    } else {
        target(client, with).await?
    };
    let (result_tx, mut results) = mpsc::channel::<Outcome>(16);
    let lines_to = match to {
        Target::User(u) if e2e => sealed_lines(client, reader, u, wait, result_tx.clone())?,
        to => Lines::Plain(to),
    };
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
    let mut stdin_open = true;
    let mut sending = 0usize;
    let mut line: Vec<u8> = Vec::new();
    let mut typing = TypingNotifier::default();
    // This device's own messages that arrived before the first ack named the conversation
    // (the first line to a user starts it): shown once the ack says whether they belong.
    let mut early: Vec<v1::Message> = Vec::new();
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
                    sending += 1;
                    match &lines_to {
                        Lines::Plain(to) => {
                            let (client, tx, to) = (client.clone(), result_tx.clone(), *to);
                            tokio::spawn(async move {
                                let res = tokio::time::timeout(wait, client.send_text(to, &text))
                                    .await
                                    .map(|r| r.map(|ack| (ack.clone(), sj::send_ack(&ack))));
                                let _ = tx.send(res).await;
                            });
                        }
                        Lines::Sealed(tx) => {
                            if tx.send(text).is_err() {
                                return Err(ClientError::Stopped);
                            }
                        }
                    }
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
                    Ok(Ok((ack, printed))) => {
                        conv.get_or_insert(ack.conversation_id);
                        out.print(&printed);
                        for m in std::mem::take(&mut early) {
                            if conv == Some(m.conversation_id) {
                                out.print(&reader.message(&m)?);
                            }
                        }
                    }
                    Ok(Err(e)) => print_error(out, &e),
                    Err(_) => {
                        let what = match lines_to {
                            Lines::Plain(_) => "SendAck (kept in the outbox)",
                            Lines::Sealed(_) => "the end-to-end send (once sealed, kept in the outbox)",
                        };
                        print_error(out, &ClientError::Timeout { what, after: wait });
                    }
                }
            }
            ev = events.next() => {
                let Some(ev) = ev else { return Err(ClientError::Stopped) };
                let show = match &ev {
                    Event::Message(m) => {
                        if conv.is_none() && peer == Some(m.sender_user_id) {
                            conv = Some(m.conversation_id);
                        }
                        if conv.is_none()
                            && sending > 0
                            && (m.sender_user_id, m.sender_device_id)
                                == (client.user_id(), client.device_id())
                        {
                            early.push(m.clone());
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
