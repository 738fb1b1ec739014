//! `presence show|watch|set`.

use std::time::Duration;

use clap::{Subcommand, ValueEnum};
use serde_json::json;
use starling_client::{Client, ClientError, Event, Events, json as sj, v1};

use super::messaging;
use super::out::Out;

/// A presence state one may set.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum State {
    /// Connected and active.
    Online,
    /// Connected but idle.
    Away,
}

#[derive(Debug, Subcommand)]
pub(crate) enum PresenceCmd {
    /// Show users' presence (online, away, or offline with last seen).
    Show {
        /// User ids or +phones, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        users: Vec<String>,
    },
    /// Show users' presence, then print every change.
    Watch {
        /// User ids or +phones, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        users: Vec<String>,
        /// Stop after this many seconds.
        #[arg(long = "for", value_name = "SECS")]
        for_secs: u64,
    },
    /// Set your presence on this connection (it ends with the command
    /// unless --hold keeps it) and whether others see your last-seen time
    /// (kept by the server).
    Set {
        /// Online or away.
        #[arg(long, value_enum, default_value = "online")]
        state: State,
        /// Hide your last-seen time from others.
        #[arg(long)]
        hide_last_seen: bool,
        /// Stay connected this many seconds with that state.
        #[arg(long, value_name = "SECS", default_value_t = 0)]
        hold: u64,
    },
}

/// Runs a presence command.
pub(crate) async fn run(
    out: &Out,
    client: &Client,
    events: Events,
    cmd: PresenceCmd,
) -> Result<(), ClientError> {
    match cmd {
        PresenceCmd::Show { users } => {
            crate::discard(events);
            let ids = messaging::users(client, &users).await?;
            for p in client.subscribe_presence(&ids).await? {
                out.print(&sj::event(&Event::Presence(p)));
            }
        }
        PresenceCmd::Watch { users, for_secs } => {
            let ids = messaging::users(client, &users).await?;
            for p in client.subscribe_presence(&ids).await? {
                out.print(&sj::event(&Event::Presence(p)));
            }
            watch(out, events, Duration::from_secs(for_secs)).await?;
        }
        PresenceCmd::Set {
            state,
            hide_last_seen,
            hold,
        } => {
            crate::discard(events);
            let wire = match state {
                State::Online => v1::PresenceState::Online,
                State::Away => v1::PresenceState::Away,
            };
            client.set_presence(wire, hide_last_seen).await?;
            out.print(&json!({
                "type": "presence_set",
                "state": format!("{state:?}").to_ascii_lowercase(),
                "hide_last_seen": hide_last_seen,
            }));
            tokio::time::sleep(Duration::from_secs(hold)).await;
        }
    }
    Ok(())
}

/// Prints presence changes (and the session's end) until `for_` passes.
async fn watch(out: &Out, mut events: Events, for_: Duration) -> Result<(), ClientError> {
    let deadline = tokio::time::Instant::now() + for_;
    while let Ok(ev) = tokio::time::timeout_at(deadline, events.next()).await {
        match ev {
            None => return Err(ClientError::Stopped),
            Some(Event::LoggedOut { reason }) => return Err(ClientError::SessionLost(reason)),
            Some(ev @ (Event::Presence(_) | Event::ServerError(_))) => out.print(&sj::event(&ev)),
            Some(_) => {}
        }
    }
    Ok(())
}
