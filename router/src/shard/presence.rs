//! Presence (see `protocol/README.md`, "Presence, typing and profiles"): SubscribePresence,
//! UnsubscribePresence, SetPresence and the PresenceUpdate pushes.
//!
//! A user's presence lives at their home shard (`ids::home_shard`): every shard tells it when a
//! connection of the user opens or closes ([`Msg::Opened`], [`Msg::Closed`]) and what
//! SetPresence set; the home works out the user's state (ONLINE if a connection is online, AWAY
//! if all are away, OFFLINE with `last_seen_ms` once none is left), keeps who follows it, and
//! sends each change to the followers' shards. Heartbeats cost nothing here: a connection that
//! stops heartbeating is closed by the gateway, which is a close like any other. Only two things
//! are written, by the home's metadata writer (off the shard thread): `last_seen_ms` when the
//! last connection goes, and `hide_last_seen` when SetPresence changes it.
//!
//! A follower's shard keeps each connection's followed users and coalesces what comes for them:
//! per connection and followed user the latest update waits (at most `presence_coalesce_ms`) and
//! goes out on the next flush, and not while the connection's backlog is above half its budget
//! (presence waits before messages do). SubscribePresence is checked at the ingress shard
//! (visibility, the per-connection limit), then each followed user's home registers the follower
//! and answers its part of the snapshot, which the ingress gathers into one PresenceSnapshot.

use std::collections::VecDeque;

use starling_protocol::v1::{self, ErrorCode, PresenceState, frame::Body};
use starling_storage::meta::{Presence as PresenceRec, keys};
use starling_storage::{CursorStore, MetadataStore, TimestampMs, UserId};

use super::frames::{Refusal, error_frame, frame, retry_frame};
use super::mail::{Inner, PresenceMsg as Msg};
use super::shared::{META_RETRY_AFTER_MS, MetaTag, Shared};
use crate::hash::{HashMap, HashSet};
use crate::ids::{ConnId, ConnRef};
use crate::metawriter::{Job, Outcome};

/// Most ids in one SubscribePresence or UnsubscribePresence (the `.proto`'s limit).
pub(super) const IDS_PER_REQUEST_MAX: usize = 1000;

/// A user's presence at their home shard.
struct Home {
    /// Their connections (anywhere), each with its AWAY flag.
    conns: Vec<(ConnRef, bool)>,
    /// When the last connection went (0: never seen going).
    last_seen_ms: u64,
    hide_last_seen: bool,
    /// Who follows them: connection → its user.
    watchers: HashMap<ConnRef, UserId>,
    /// Writes of their record not finished yet (the entry stays while there are any).
    writes: u32,
}

impl Home {
    /// The state and last seen time as the user sees them.
    fn state(&self) -> (PresenceState, u64) {
        if self.conns.is_empty() {
            (PresenceState::Offline, self.last_seen_ms)
        } else if self.conns.iter().all(|&(_, away)| away) {
            (PresenceState::Away, 0)
        } else {
            (PresenceState::Online, 0)
        }
    }

    /// What `viewer` sees of `user`.
    fn view(&self, user: UserId, viewer: UserId) -> v1::PresenceUpdate {
        let (state, last_seen) = self.state();
        let hidden = self.hide_last_seen && viewer != user;
        v1::PresenceUpdate {
            user_id: user.0,
            state: state as i32,
            last_seen_ms: if hidden { 0 } else { last_seen },
        }
    }

    fn unused(&self) -> bool {
        self.conns.is_empty() && self.watchers.is_empty() && self.writes == 0
    }
}

/// A connection's follows, at its shard.
#[derive(Default)]
struct Follows {
    users: HashSet<UserId>,
    /// The latest update per followed user not sent yet.
    pending: HashMap<UserId, v1::PresenceUpdate>,
    /// Snapshots being gathered, by request id: parts still to come, and what came.
    snapshots: HashMap<u64, (usize, Vec<v1::PresenceUpdate>)>,
}

/// Presence state of one shard: its users' (as their home) and its connections' follows.
#[derive(Default)]
pub(super) struct Presence {
    homes: HashMap<UserId, Home>,
    follows: HashMap<ConnId, Follows>,
    /// Connections with pending updates, in the order they got their first.
    dirty: VecDeque<ConnId>,
    dirty_set: HashSet<ConnId>,
    /// When pending updates go out next.
    flush_due_ms: Option<u64>,
}

impl Presence {
    // -----------------------------------------------------------------------------------------
    // at the connection's shard

    /// An authenticated connection of `user` opened here: its home learns of it.
    pub(super) fn conn_opened<I, M>(sh: &mut Shared<I, M>, conn: ConnId, user: UserId) {
        let conn = ConnRef {
            shard: sh.mail.shard(),
            conn,
        };
        let home = sh.mail.home(user);
        sh.send_to(home, Inner::Presence(Msg::Opened { user, conn }));
    }

    /// `conn` of `user` closed: its home learns of it, and it follows nobody any more.
    pub(super) fn conn_closed<I, M>(&mut self, sh: &mut Shared<I, M>, conn: ConnId, user: UserId) {
        let me = ConnRef {
            shard: sh.mail.shard(),
            conn,
        };
        let home = sh.mail.home(user);
        sh.send_to(home, Inner::Presence(Msg::Closed { user, conn: me }));
        if let Some(f) = self.follows.remove(&conn) {
            unwatch(sh, me, f.users.into_iter());
        }
    }

    /// SetPresence: on to the user's home, which answers it.
    pub(super) fn set<I, M>(
        sh: &mut Shared<I, M>,
        origin: ConnRef,
        rid: u64,
        user: UserId,
        req: &v1::SetPresence,
    ) -> Result<(), Refusal> {
        let away = match PresenceState::try_from(req.state) {
            Ok(PresenceState::Online) => false,
            Ok(PresenceState::Away) => true,
            _ => {
                return Err(Refusal(
                    ErrorCode::InvalidArgument,
                    "SetPresence.state must be ONLINE or AWAY".into(),
                ));
            }
        };
        let home = sh.mail.home(user);
        let m = Msg::Set {
            user,
            conn: origin,
            request_id: rid,
            away,
            hide_last_seen: req.hide_last_seen,
        };
        sh.send_to(home, Inner::Presence(m));
        Ok(())
    }

    /// SubscribePresence: checked here (ids, the connection's limit, visibility), then each
    /// followed user's home registers the follower and sends its part of the snapshot.
    pub(super) fn subscribe<I, M: MetadataStore>(
        &mut self,
        sh: &mut Shared<I, M>,
        origin: ConnRef,
        rid: u64,
        user: UserId,
        req: &v1::SubscribePresence,
    ) -> Result<(), Refusal> {
        let users = ids(&req.user_ids)?;
        let follows = self.follows.get(&origin.conn);
        let new = users
            .iter()
            .filter(|u| follows.is_none_or(|f| !f.users.contains(u)))
            .count();
        let now_following = follows.map_or(0, |f| f.users.len());
        let max = sh.cfg.presence_subscriptions_max;
        if now_following + new > max {
            return Err(Refusal(
                ErrorCode::InvalidArgument,
                format!(
                    "a connection may follow at most {max} users (presence_subscriptions_max): \
                     it follows {now_following}, this request adds {new}; nothing was subscribed"
                ),
            ));
        }
        let seen = crate::visibility::visible(&*sh.meta, user, &users)
            .map_err(|e| Refusal::storage("presence visibility", &e))?;
        let refused: Vec<String> = users
            .iter()
            .zip(&seen)
            .filter(|(_, v)| !**v)
            .map(|(u, _)| u.0.to_string())
            .collect();
        if !refused.is_empty() {
            let shown = refused.len().min(20);
            return Err(Refusal(
                ErrorCode::PermissionDenied,
                format!(
                    "not visible to you (no shared conversation, not a contact): {}{}; \
                     nothing was subscribed",
                    refused[..shown].join(", "),
                    if refused.len() > shown { ", ..." } else { "" }
                ),
            ));
        }
        let f = self.follows.entry(origin.conn).or_default();
        let mut by_home: HashMap<usize, Vec<UserId>> = HashMap::default();
        for u in users {
            f.users.insert(u);
            by_home.entry(sh.mail.home(u)).or_default().push(u);
        }
        if by_home.is_empty() {
            let snap = frame(rid, Body::PresenceSnapshot(v1::PresenceSnapshot::default()));
            sh.emit(origin.conn, snap, false);
            return Ok(());
        }
        f.snapshots.insert(rid, (by_home.len(), Vec::new()));
        for (home, users) in by_home {
            let m = Msg::Watch {
                watcher: origin,
                watcher_user: user,
                request_id: rid,
                users,
            };
            sh.send_to(home, Inner::Presence(m));
        }
        Ok(())
    }

    /// UnsubscribePresence: forgotten here at once (nothing more is pushed for them), and at
    /// the homes.
    pub(super) fn unsubscribe<I, M>(
        &mut self,
        sh: &mut Shared<I, M>,
        origin: ConnRef,
        rid: u64,
        req: &v1::UnsubscribePresence,
    ) -> Result<(), Refusal> {
        if req.user_ids.len() > IDS_PER_REQUEST_MAX {
            return Err(too_many());
        }
        let mut gone = Vec::new();
        if let Some(f) = self.follows.get_mut(&origin.conn) {
            for &u in &req.user_ids {
                if f.users.remove(&UserId(u)) {
                    f.pending.remove(&UserId(u));
                    gone.push(UserId(u));
                }
            }
        }
        unwatch(sh, origin, gone.into_iter());
        sh.emit(origin.conn, frame(rid, Body::Done(v1::Done {})), false);
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // messages

    /// A presence message from another shard (or this one).
    pub(super) fn on_msg<I, M: MetadataStore + CursorStore>(
        &mut self,
        sh: &mut Shared<I, M>,
        m: Msg,
    ) {
        match m {
            Msg::Opened { user, conn } => {
                self.change(sh, user, |h| h.conns.push((conn, false)));
            }
            Msg::Closed { user, conn } => {
                let now = sh.now_ms;
                let went = self.change(sh, user, |h| {
                    let before = h.conns.len();
                    h.conns.retain(|(c, _)| *c != conn);
                    if h.conns.is_empty() && before > 0 {
                        h.last_seen_ms = now;
                    }
                });
                if went && self.homes.get(&user).is_some_and(|h| h.conns.is_empty()) {
                    self.write(sh, user, None);
                }
                self.forget_if_unused(user);
            }
            Msg::Set {
                user,
                conn,
                request_id,
                away,
                hide_last_seen,
            } => self.on_set(sh, user, conn, request_id, away, hide_last_seen),
            Msg::Watch {
                watcher,
                watcher_user,
                request_id,
                users,
            } => {
                let mut part = Vec::with_capacity(users.len());
                for u in users {
                    let h = self.home(sh, u);
                    h.watchers.insert(watcher, watcher_user);
                    part.push(h.view(u, watcher_user));
                }
                let m = Msg::Part {
                    to: watcher.conn,
                    request_id,
                    users: part,
                };
                sh.send_to(watcher.shard, Inner::Presence(m));
            }
            Msg::Unwatch { watcher, users } => {
                for u in users {
                    if let Some(h) = self.homes.get_mut(&u) {
                        h.watchers.remove(&watcher);
                    }
                    self.forget_if_unused(u);
                }
            }
            Msg::Part {
                to,
                request_id,
                users,
            } => self.on_part(sh, to, request_id, users),
            Msg::Updates(items) => {
                for (conn, up) in items {
                    self.pend(sh, conn, up);
                }
            }
        }
    }

    /// The presence record of `user` was written (or not): answer the SetPresence that waited
    /// for it, if one did.
    pub(super) fn written<I, M>(
        &mut self,
        sh: &mut Shared<I, M>,
        user: UserId,
        reply: Option<(ConnRef, u64)>,
        outcome: Outcome,
    ) {
        if let Some(h) = self.homes.get_mut(&user) {
            h.writes = h.writes.saturating_sub(1);
        }
        self.forget_if_unused(user);
        if let Some((to, rid)) = reply {
            let f = match outcome {
                Ok(_) => frame(rid, Body::Done(v1::Done {})),
                Err(Refusal(code, msg)) => error_frame(rid, code, msg),
            };
            sh.reply(to, vec![f]);
        }
    }

    // -----------------------------------------------------------------------------------------
    // timer

    /// When pending updates go out next, if any wait.
    pub(super) fn due_ms(&self) -> Option<u64> {
        self.flush_due_ms
    }

    /// Sends the pending updates of every connection that has room for them (and no snapshot
    /// on its way: updates never overtake the snapshot they follow); the others wait for the
    /// next flush.
    pub(super) fn tick<I, M>(&mut self, sh: &mut Shared<I, M>) {
        if self.flush_due_ms.is_none_or(|d| d > sh.now_ms) {
            return;
        }
        self.flush_due_ms = None;
        for _ in 0..self.dirty.len() {
            let Some(conn) = self.dirty.pop_front() else {
                break;
            };
            let Some(f) = self.follows.get_mut(&conn) else {
                self.dirty_set.remove(&conn);
                continue;
            };
            if f.snapshots.is_empty() {
                let users: Vec<UserId> = f.pending.keys().copied().collect();
                for u in users {
                    if !sh.out.has_headroom(&sh.dir, conn) {
                        break;
                    }
                    if let Some(up) = f.pending.remove(&u) {
                        sh.emit(conn, frame(0, Body::PresenceUpdate(up)), true);
                    }
                }
            }
            if f.pending.is_empty() {
                self.dirty_set.remove(&conn);
            } else {
                self.dirty.push_back(conn);
            }
        }
        if !self.dirty.is_empty() {
            self.flush_due_ms = Some(sh.now_ms + sh.cfg.presence_coalesce_ms);
        }
    }

    // -----------------------------------------------------------------------------------------
    // plumbing

    /// `user`'s entry at their home, loaded from the metadata on first use.
    fn home<I, M: MetadataStore>(&mut self, sh: &Shared<I, M>, user: UserId) -> &mut Home {
        debug_assert_eq!(sh.mail.home(user), sh.mail.shard());
        self.homes.entry(user).or_insert_with(|| {
            // A read that fails hides the last seen time rather than show what it should not
            // (a storage fault stops the server anyway).
            let (last_seen_ms, hide_last_seen) = match sh.meta.get::<PresenceRec>(&keys::user(user))
            {
                Ok(Some(r)) => (r.last_seen_ms.0, r.hide_last_seen),
                Ok(None) => (0, false),
                Err(_) => (0, true),
            };
            Home {
                conns: Vec::new(),
                last_seen_ms,
                hide_last_seen,
                watchers: HashMap::default(),
                writes: 0,
            }
        })
    }

    /// Applies `f` to `user`'s entry and sends the followers what changed; says whether the
    /// state changed.
    fn change<I, M: MetadataStore>(
        &mut self,
        sh: &mut Shared<I, M>,
        user: UserId,
        f: impl FnOnce(&mut Home),
    ) -> bool {
        let h = self.home(sh, user);
        let before = h.state();
        f(h);
        if h.state() == before {
            return false;
        }
        let mut by_shard: HashMap<usize, Vec<(ConnId, v1::PresenceUpdate)>> = HashMap::default();
        for (w, viewer) in &h.watchers {
            by_shard
                .entry(w.shard)
                .or_default()
                .push((w.conn, h.view(user, *viewer)));
        }
        for (shard, items) in by_shard {
            sh.send_to(shard, Inner::Presence(Msg::Updates(items)));
        }
        true
    }

    fn on_set<I, M: MetadataStore + CursorStore>(
        &mut self,
        sh: &mut Shared<I, M>,
        user: UserId,
        conn: ConnRef,
        rid: u64,
        away: bool,
        hide: bool,
    ) {
        let hide_changes = self.home(sh, user).hide_last_seen != hide;
        if hide_changes && sh.writer.queued() >= sh.cfg.meta_jobs_max {
            let f = retry_frame(
                rid,
                ErrorCode::Overloaded,
                "too many metadata writes are waiting; nothing was changed".into(),
                META_RETRY_AFTER_MS,
            );
            sh.reply(conn, vec![f]);
            return;
        }
        self.change(sh, user, |h| {
            if let Some(c) = h.conns.iter_mut().find(|(c, _)| *c == conn) {
                c.1 = away;
            }
            h.hide_last_seen = hide;
        });
        if hide_changes {
            self.write(sh, user, Some((conn, rid)));
        } else {
            sh.reply(conn, vec![frame(rid, Body::Done(v1::Done {}))]);
        }
        self.forget_if_unused(user);
    }

    /// Writes `user`'s record (last seen, hide flag) through the metadata writer; `reply` waits
    /// for it. A last seen time the writer has no room for is not written (it lives on in
    /// memory until a restart), counted in `ShardStats::presence_unwritten`.
    fn write<I, M: MetadataStore + CursorStore>(
        &mut self,
        sh: &mut Shared<I, M>,
        user: UserId,
        reply: Option<(ConnRef, u64)>,
    ) {
        if reply.is_none() && sh.writer.queued() >= sh.cfg.meta_jobs_max {
            sh.stats.presence_unwritten += 1;
            return;
        }
        let h = self.home(sh, user);
        h.writes += 1;
        let rec = PresenceRec {
            user,
            last_seen_ms: TimestampMs(h.last_seen_ms),
            hide_last_seen: h.hide_last_seen,
        };
        sh.writer.submit(
            &*sh.meta,
            Job::Presence(rec),
            MetaTag::Presence { user, reply },
        );
    }

    fn forget_if_unused(&mut self, user: UserId) {
        if self.homes.get(&user).is_some_and(Home::unused) {
            self.homes.remove(&user);
        }
    }

    fn on_part<I, M>(
        &mut self,
        sh: &mut Shared<I, M>,
        to: ConnId,
        rid: u64,
        users: Vec<v1::PresenceUpdate>,
    ) {
        let Some(f) = self.follows.get_mut(&to) else {
            return;
        };
        let Some((left, got)) = f.snapshots.get_mut(&rid) else {
            return;
        };
        got.extend(users);
        *left -= 1;
        if *left > 0 {
            return;
        }
        if let Some((_, users)) = f.snapshots.remove(&rid) {
            // Updates that came before the snapshot are older than it.
            for u in &users {
                f.pending.remove(&UserId(u.user_id));
            }
            let snap = frame(rid, Body::PresenceSnapshot(v1::PresenceSnapshot { users }));
            sh.emit(to, snap, false);
        }
    }

    /// An update for `conn`: it waits (the latest per user) for the next flush.
    fn pend<I, M>(&mut self, sh: &Shared<I, M>, conn: ConnId, up: v1::PresenceUpdate) {
        let Some(f) = self.follows.get_mut(&conn) else {
            return;
        };
        let user = UserId(up.user_id);
        if !f.users.contains(&user) {
            return;
        }
        f.pending.insert(user, up);
        if self.dirty_set.insert(conn) {
            self.dirty.push_back(conn);
        }
        if self.flush_due_ms.is_none() {
            self.flush_due_ms = Some(sh.now_ms + sh.cfg.presence_coalesce_ms);
        }
    }
}

/// The distinct users of a request's ids (at most [`IDS_PER_REQUEST_MAX`], none 0).
fn ids(raw: &[u64]) -> Result<Vec<UserId>, Refusal> {
    if raw.len() > IDS_PER_REQUEST_MAX {
        return Err(too_many());
    }
    if raw.contains(&0) {
        return Err(Refusal(ErrorCode::InvalidArgument, "user id 0".into()));
    }
    let mut seen = HashSet::default();
    Ok(raw
        .iter()
        .map(|&u| UserId(u))
        .filter(|u| seen.insert(*u))
        .collect())
}

fn too_many() -> Refusal {
    Refusal(
        ErrorCode::InvalidArgument,
        format!("at most {IDS_PER_REQUEST_MAX} user ids per request"),
    )
}

/// Tells the homes of `users` that `watcher` follows them no more.
fn unwatch<I, M>(sh: &mut Shared<I, M>, watcher: ConnRef, users: impl Iterator<Item = UserId>) {
    let mut by_home: HashMap<usize, Vec<UserId>> = HashMap::default();
    for u in users {
        by_home.entry(sh.mail.home(u)).or_default().push(u);
    }
    for (home, users) in by_home {
        sh.send_to(home, Inner::Presence(Msg::Unwatch { watcher, users }));
    }
}

#[cfg(test)]
mod tests;
