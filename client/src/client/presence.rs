//! Presence, typing and other users' profiles.
//!
//! A presence subscription and a connection's presence state last as long
//! as the connection; the client remembers both ([`Sticky`]) and the driver
//! restores them on every new connection, reporting the new snapshot as
//! [`Event::Presence`](crate::Event::Presence) events.

use std::collections::BTreeSet;
use std::time::Duration;

use starling_protocol::v1::{self, frame::Body};

use super::Client;
use crate::error::ClientError;

/// What outlives a connection: restored by the driver on each new one.
#[derive(Debug, Default)]
pub(super) struct Sticky {
    /// Users whose presence is followed.
    pub(super) presence_subscriptions: BTreeSet<u64>,
    /// The presence last set with [`Client::set_presence`] (a new
    /// connection is ONLINE until told otherwise).
    pub(super) presence: Option<v1::SetPresence>,
    /// The key directory was used: each new connection sends an empty
    /// `UploadKeys`, which also makes it receive the directory's pushes.
    pub(super) keys_pushes: bool,
}

impl Client {
    /// Follows users' presence: returns their current presence; later
    /// changes arrive as [`Event::Presence`](crate::Event::Presence). The
    /// subscription is renewed on every reconnect.
    pub async fn subscribe_presence(
        &self,
        user_ids: &[u64],
    ) -> Result<Vec<v1::PresenceUpdate>, ClientError> {
        let req = Body::SubscribePresence(v1::SubscribePresence {
            user_ids: user_ids.to_vec(),
        });
        match self.request(req).await? {
            Body::PresenceSnapshot(s) => {
                self.sticky().presence_subscriptions.extend(user_ids);
                Ok(s.users)
            }
            other => Err(ClientError::unexpected("PresenceSnapshot", Some(&other))),
        }
    }

    /// Stops following users' presence.
    pub async fn unsubscribe_presence(&self, user_ids: &[u64]) -> Result<(), ClientError> {
        {
            let mut sticky = self.sticky();
            for u in user_ids {
                sticky.presence_subscriptions.remove(u);
            }
        }
        self.expect_done(Body::UnsubscribePresence(v1::UnsubscribePresence {
            user_ids: user_ids.to_vec(),
        }))
        .await
    }

    /// Sets this device's presence (ONLINE or AWAY) and whether others see
    /// the user's last-seen time. Restored on every reconnect.
    pub async fn set_presence(
        &self,
        state: v1::PresenceState,
        hide_last_seen: bool,
    ) -> Result<(), ClientError> {
        let set = v1::SetPresence {
            state: state.into(),
            hide_last_seen,
        };
        self.expect_done(Body::SetPresence(set)).await?;
        self.sticky().presence = Some(set);
        Ok(())
    }

    /// Tells the conversation's other members' online devices that the
    /// user is typing (repeat every few seconds while typing: the state
    /// expires) or stopped. Fire and forget: never stored or queued; an
    /// `Error` about it arrives as [`Event::ServerError`](crate::Event).
    pub async fn typing(
        &self,
        conversation_id: u64,
        state: v1::TypingState,
    ) -> Result<(), ClientError> {
        let conn = self.connection().await?;
        conn.send_oneway(Body::Typing(v1::Typing {
            conversation_id,
            state: state.into(),
            user_id: 0,
        }))
        .await
    }

    /// Other users' public profiles (those the caller may see; the others
    /// are left out, like unknown users).
    pub async fn profiles(&self, user_ids: &[u64]) -> Result<Vec<v1::Profile>, ClientError> {
        let req = Body::GetProfiles(v1::GetProfiles {
            user_ids: user_ids.to_vec(),
        });
        match self.request(req).await? {
            Body::Profiles(p) => Ok(p.profiles),
            other => Err(ClientError::unexpected("Profiles", Some(&other))),
        }
    }

    pub(super) fn sticky(&self) -> std::sync::MutexGuard<'_, Sticky> {
        // Plain data updated in single steps: consistent even after a panic.
        self.sticky
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Restores the subscriptions and presence of `sticky` on a new
/// connection: the requests to send, in order.
pub(super) fn restore_requests(sticky: &Sticky) -> Vec<Body> {
    let mut out = Vec::new();
    if let Some(set) = sticky.presence
        && set.state != v1::PresenceState::Online as i32
    {
        out.push(Body::SetPresence(set));
    }
    if sticky.keys_pushes {
        out.push(Body::UploadKeys(v1::UploadKeys::default()));
    }
    let users: Vec<u64> = sticky.presence_subscriptions.iter().copied().collect();
    // The server takes at most 1,000 ids per request.
    for chunk in users.chunks(1000) {
        out.push(Body::SubscribePresence(v1::SubscribePresence {
            user_ids: chunk.to_vec(),
        }));
    }
    out
}

/// How long a restore request may take before it is given up (the next
/// reconnect tries again).
pub(super) const RESTORE_WAIT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_sends_away_and_the_subscriptions_in_chunks() {
        let mut s = Sticky::default();
        assert!(restore_requests(&s).is_empty());
        s.presence = Some(v1::SetPresence {
            state: v1::PresenceState::Online.into(),
            hide_last_seen: false,
        });
        // ONLINE is what a new connection is anyway.
        assert!(restore_requests(&s).is_empty());
        s.presence = Some(v1::SetPresence {
            state: v1::PresenceState::Away.into(),
            hide_last_seen: true,
        });
        s.presence_subscriptions.extend(1..=1500);
        let reqs = restore_requests(&s);
        assert_eq!(reqs.len(), 3);
        assert!(matches!(&reqs[0], Body::SetPresence(p) if p.hide_last_seen));
        let Body::SubscribePresence(a) = &reqs[1] else {
            panic!("{reqs:?}")
        };
        let Body::SubscribePresence(b) = &reqs[2] else {
            panic!("{reqs:?}")
        };
        assert_eq!((a.user_ids.len(), b.user_ids.len()), (1000, 500));
        assert_eq!(a.user_ids[0], 1);
        assert_eq!(b.user_ids[499], 1500);
        // After the key directory was used, each connection asks for its count.
        s.keys_pushes = true;
        let reqs = restore_requests(&s);
        assert!(matches!(&reqs[1], Body::UploadKeys(u) if *u == v1::UploadKeys::default()));
    }
}
