//! This shard's slice of the session directory: its own connections (connection → user,
//! device and outbound state) and, per user, their connections here. Fan-out looks members up
//! in it locally, so a connection is visible to pushes the moment it opens (see
//! `docs/design/messaging.md`, "Session directory and fan-out").

use std::collections::BTreeMap;

use starling_storage::{DeviceId, UserId};

use super::gather::{ListGather, SyncGather};
use crate::hash::{HashMap, HashSet};
use crate::ids::{ConnId, ConvId};

/// One connection of this shard, authenticated as one device of one user.
pub(super) struct Conn {
    pub(super) user: UserId,
    pub(super) device: DeviceId,
    /// Bytes emitted and not yet reported written by the gateway.
    pub(super) queued_bytes: u64,
    /// Behind: a push found the backlog over budget. Pushes turn into hints until the backlog
    /// is down to half the budget (or the device syncs).
    pub(super) behind: bool,
    /// State only a connection that is behind or has a Sync/list outstanding needs, boxed so an
    /// idle connection's directory entry stays a few dozen bytes (it is per connection, and
    /// idle connections are most of them).
    pub(super) more: Option<Box<ConnMore>>,
}

/// A connection's state beyond the common case (see [`Conn::more`]).
#[derive(Default)]
pub(super) struct ConnMore {
    /// Latest seq per conversation not pushed while behind.
    pub(super) hints: BTreeMap<ConvId, u64>,
    /// Since when the backlog has been over budget without a break (for
    /// `slow_consumer_close_ms`); `None` while it is within the budget.
    pub(super) over_since_ms: Option<u64>,
    /// A close was requested (the connection is left alone until it is gone).
    pub(super) closing: bool,
    /// Syncs in progress, by request id.
    pub(super) syncs: HashMap<u64, SyncGather>,
    /// Conversation lists in progress, by request id.
    pub(super) lists: HashMap<u64, ListGather>,
}

impl Conn {
    fn new(user: UserId, device: DeviceId) -> Conn {
        Conn {
            user,
            device,
            queued_bytes: 0,
            behind: false,
            more: None,
        }
    }

    /// The boxed state, made on first use.
    pub(super) fn more(&mut self) -> &mut ConnMore {
        self.more.get_or_insert_with(Box::default)
    }

    /// Since when the backlog has been over budget, unless a close was requested already.
    pub(super) fn over_since_ms(&self) -> Option<u64> {
        self.more
            .as_ref()
            .filter(|m| !m.closing)
            .and_then(|m| m.over_since_ms)
    }

    /// Whether the tick needs to look at this connection (hints to emit or a close clock).
    pub(super) fn watched(&self) -> bool {
        self.behind || self.over_since_ms().is_some()
    }

    /// Frees the boxed state once nothing in it is in use.
    pub(super) fn tidy(&mut self) {
        if self.more.as_ref().is_some_and(|m| {
            m.hints.is_empty()
                && m.over_since_ms.is_none()
                && !m.closing
                && m.syncs.is_empty()
                && m.lists.is_empty()
        }) {
            self.more = None;
        }
    }
}

/// The shard's connections and, per user, theirs.
#[derive(Default)]
pub(super) struct Directory {
    pub(super) conns: HashMap<ConnId, Conn>,
    /// Connections behind (pushes turned into hints) or over their backlog budget (the close
    /// clock runs): the tick looks at them.
    pub(super) watched: HashSet<ConnId>,
    users: HashMap<UserId, Vec<ConnId>>,
}

impl Directory {
    /// `conn` authenticated as `user`'s `device` opened here.
    pub(super) fn open(&mut self, conn: ConnId, user: UserId, device: DeviceId) {
        self.conns.insert(conn, Conn::new(user, device));
        // Most users have one device online: no spare capacity per entry.
        self.users
            .entry(user)
            .or_insert_with(|| Vec::with_capacity(1))
            .push(conn);
    }

    /// `conn` is gone, with everything it held.
    pub(super) fn close(&mut self, conn: ConnId) {
        self.watched.remove(&conn);
        if let Some(c) = self.conns.remove(&conn)
            && let Some(list) = self.users.get_mut(&c.user)
        {
            list.retain(|x| *x != conn);
            if list.is_empty() {
                self.users.remove(&c.user);
            }
        }
    }

    /// The `i`-th of `user`'s connections here, if there are that many. By index, so a caller can
    /// walk them while it changes the directory (a list cloned per member per message was an
    /// allocation each).
    pub(super) fn user_conn(&self, user: &UserId, i: usize) -> Option<ConnId> {
        self.users.get(user).and_then(|c| c.get(i)).copied()
    }

    /// Which of `members` (ascending) have a connection here, walking whichever is shorter:
    /// the list, or the users connected here (a 100,000-member group on a shard with a few
    /// thousand users costs a few thousand lookups, not 100,000).
    pub(super) fn connected_of(&self, members: &[UserId]) -> Vec<UserId> {
        if members.len() <= self.users.len() {
            members
                .iter()
                .filter(|u| self.users.contains_key(u))
                .copied()
                .collect()
        } else {
            self.users
                .keys()
                .filter(|u| members.binary_search(u).is_ok())
                .copied()
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conns_of(d: &Directory, u: u64) -> Vec<ConnId> {
        (0..).map_while(|i| d.user_conn(&UserId(u), i)).collect()
    }

    #[test]
    fn a_user_is_known_while_any_of_their_connections_is_open() {
        let mut d = Directory::default();
        d.open(ConnId(1), UserId(7), DeviceId(1));
        d.open(ConnId(2), UserId(7), DeviceId(2));
        d.open(ConnId(3), UserId(8), DeviceId(1));
        assert_eq!(conns_of(&d, 7), [ConnId(1), ConnId(2)]);
        d.close(ConnId(1));
        assert_eq!(conns_of(&d, 7), [ConnId(2)]);
        d.close(ConnId(2));
        assert!(conns_of(&d, 7).is_empty());
        assert!(
            !d.users.contains_key(&UserId(7)),
            "an empty entry is dropped"
        );
        assert_eq!(conns_of(&d, 8), [ConnId(3)]);
        // Closing twice, or an unknown connection, changes nothing.
        d.close(ConnId(2));
        d.close(ConnId(99));
        assert_eq!(d.conns.len(), 1);
    }

    #[test]
    fn connected_members_are_found_from_either_side() {
        let mut d = Directory::default();
        for (c, u) in [(1, 3), (2, 5), (3, 5), (4, 9)] {
            d.open(ConnId(c), UserId(u), DeviceId(1));
        }
        let sorted = |m: &[u64]| {
            let list: Vec<UserId> = m.iter().map(|&u| UserId(u)).collect();
            let mut v = d.connected_of(&list);
            v.sort_unstable();
            v.into_iter().map(|u| u.0).collect::<Vec<_>>()
        };
        // Fewer members than users here: the list is walked.
        assert_eq!(sorted(&[5, 6]), [5]);
        // More members than users here: the users are walked, the list binary-searched.
        let many: Vec<u64> = (1..=1000).collect();
        assert_eq!(sorted(&many), [3, 5, 9]);
        assert_eq!(sorted(&[1, 2, 4, 6, 7, 8]), Vec::<u64>::new());
    }

    #[test]
    fn the_boxed_state_is_freed_once_unused_and_a_closing_connection_stops_its_clock() {
        let mut c = Conn::new(UserId(1), DeviceId(1));
        assert!(!c.watched());
        c.more().over_since_ms = Some(5);
        assert!(c.watched());
        assert_eq!(c.over_since_ms(), Some(5));
        c.more().closing = true;
        assert_eq!(c.over_since_ms(), None, "a close was requested already");
        c.tidy();
        assert!(c.more.is_some(), "still closing");
        c.more = None;
        c.more().hints.insert(ConvId(3), 9);
        c.tidy();
        assert!(c.more.is_some(), "a hint is pending");
        c.more().hints.clear();
        c.tidy();
        assert!(c.more.is_none());
    }
}
