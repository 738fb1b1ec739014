//! The end-to-end key directory's front (`protocol/README.md`, "End-to-end key directory"):
//! UploadKeys, FetchKeyBundles, the low-stock `PrekeyCount` push and the `DeviceListChanged`
//! push when a user's devices change.
//!
//! Every key request of the node goes to **one** writer thread (`starling-keys`), which owns
//! the [`KeyDirectory`] (`starling_storage::keys`): it takes the requests waiting in its queue
//! (up to `keys.batch_max`), carries them out against one open batch and makes the batch
//! durable with one redb commit before it answers any of them (group commit; an upload is
//! committed on its own, after the fetches before it; a `list_only` fetch takes nothing and is
//! answered at once). Being the only writer of the key
//! tables is what makes each one-time prekey go out once, whichever shard the fetches come
//! from; answering only after the commit is what keeps that true across a crash. Shards never
//! wait on it: a connection awaits its answer ([`Answer`]) like it awaits the blocking pool.
//!
//! Signatures are checked on the writer thread (Ed25519 from `ring`, which the gateway already
//! uses for TLS): uploads are rare, fetches check none.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use starling_protocol::FrameKind;
use starling_protocol::v1::{self, ErrorCode, frame::Body};
use starling_storage::keys::{Bundle, KeyDirectory, KeyError, LowStock, Upload};
use starling_storage::meta::{Member, MemberOf, keys};
use starling_storage::{DeviceId, EmbeddedMeta, MetadataStore, StorageError, TimestampMs, UserId};

use crate::accounts::{ApiError, Principal};
use crate::clock;
use crate::config::KeysConfig;
use crate::shard::{Control, Shard};

/// Most `device_ids` in one FetchKeyBundles (the `.proto`'s limit).
pub const FETCH_DEVICE_IDS_MAX: usize = 64;
/// Most conversations of a user read to find whom a device change is pushed to (the `.proto`
/// states it on `DeviceListChanged`; reaching it is logged).
const PEER_CONVS_MAX: usize = 10_000;
/// Most users a device change is pushed to (stated and logged alike).
const PEERS_MAX: usize = 100_000;

/// A frame pushed by the key directory to the authenticated connections of some users, on
/// every shard ([`Control::Push`]).
#[derive(Debug)]
pub struct Push {
    /// The users whose connections get it, sorted.
    pub users: Vec<u64>,
    /// Only this device's connections (`None`: every device of the users).
    pub device: Option<u32>,
    /// The encoded frame (request_id 0), as it goes on the wire.
    pub bytes: Bytes,
    /// Its kind.
    pub kind: FrameKind,
}

impl Push {
    fn new(users: Vec<u64>, device: Option<u32>, body: Body) -> Option<Self> {
        let kind = body.kind();
        let frame = v1::Frame {
            request_id: 0,
            body: Some(body),
        };
        let mut buf = BytesMut::new();
        starling_protocol::FrameEncoder::new(u32::MAX)
            .encode(&frame, &mut buf)
            .ok()?;
        Some(Push {
            users,
            device,
            bytes: buf.freeze(),
            kind,
        })
    }

    /// Whether a connection of `user`'s `device` gets it.
    #[must_use]
    pub fn is_for(&self, user: u64, device: u32) -> bool {
        self.device.is_none_or(|d| d == device) && self.users.binary_search(&user).is_ok()
    }
}

// ---------------------------------------------------------------------------------------------
// the service

/// The handle the connections use (cheap to clone): a bounded queue to the writer thread.
#[derive(Debug, Clone)]
pub struct KeyService {
    tx: SyncSender<Job>,
}

#[derive(Debug)]
enum Job {
    Upload {
        p: Principal,
        req: v1::UploadKeys,
        reply: Reply<Result<v1::PrekeyCount, ApiError>>,
    },
    Fetch {
        p: Principal,
        req: v1::FetchKeyBundles,
        reply: Reply<Result<v1::KeyBundles, ApiError>>,
    },
    DevicesChanged {
        user: u64,
        added: Vec<u32>,
        removed: Vec<u32>,
        reply: Reply<Result<(), ApiError>>,
    },
}

impl KeyService {
    /// Starts the writer thread over `meta`; pushes go to every shard through `controls`.
    /// `io_cpus` (if not empty) is where it runs, like the other storage writers.
    ///
    /// # Errors
    /// The thread could not be started.
    pub fn start(
        meta: Arc<EmbeddedMeta>,
        cfg: &KeysConfig,
        controls: Vec<mpsc::Sender<Control>>,
        io_cpus: Vec<usize>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(cfg.queue_max);
        let dir = KeyDirectory::new(
            meta.clone(),
            cfg.one_time_prekeys_max,
            cfg.low_stock_threshold,
        );
        let batch_max = cfg.batch_max;
        std::thread::Builder::new()
            .name("starling-keys".into())
            .spawn(move || {
                if !io_cpus.is_empty()
                    && let Err(e) = crate::cpus::pin_current_thread(&io_cpus)
                {
                    tracing::warn!(error = %e, "cannot place the key directory's writer");
                }
                Writer {
                    meta,
                    dir,
                    controls,
                    batch_max,
                }
                .run(&rx);
            })?;
        Ok(Self { tx })
    }

    fn submit<T>(&self, make: impl FnOnce(Reply<T>) -> Job) -> Result<Answer<T>, ApiError> {
        let (reply, answer) = channel();
        match self.tx.try_send(make(reply)) {
            Ok(()) => Ok(answer),
            Err(TrySendError::Full(_)) => Err(ApiError {
                code: ErrorCode::Overloaded,
                message: "the key directory is busy; retry".into(),
                retry_after_ms: 100,
            }),
            Err(TrySendError::Disconnected(_)) => Err(stopped()),
        }
    }

    async fn wait<T>(
        &self,
        make: impl FnOnce(Reply<Result<T, ApiError>>) -> Job,
    ) -> Result<T, ApiError> {
        self.submit(make)?.await.unwrap_or_else(|| Err(stopped()))
    }

    /// UploadKeys: the stock after it, once durable.
    ///
    /// # Errors
    /// The refusals of the `.proto`; `OVERLOADED`; `STORAGE_FAILURE`.
    pub async fn upload(
        &self,
        p: Principal,
        req: v1::UploadKeys,
    ) -> Result<v1::PrekeyCount, ApiError> {
        self.wait(|reply| Job::Upload { p, req, reply }).await
    }

    /// FetchKeyBundles: the bundles, their one-time prekeys durably taken (`list_only`: none
    /// taken, answered without waiting for a commit).
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`; `OVERLOADED`; `STORAGE_FAILURE`.
    pub async fn fetch(
        &self,
        p: Principal,
        req: v1::FetchKeyBundles,
    ) -> Result<v1::KeyBundles, ApiError> {
        self.wait(|reply| Job::Fetch { p, req, reply }).await
    }

    /// `user` gained `added` and lost `removed` devices: the removed devices' keys are deleted
    /// (durably, before this returns) and `DeviceListChanged` is pushed to the user and its
    /// conversation peers.
    ///
    /// # Errors
    /// `OVERLOADED`; `STORAGE_FAILURE`.
    pub async fn devices_changed(
        &self,
        user: u64,
        added: Vec<u32>,
        removed: Vec<u32>,
    ) -> Result<(), ApiError> {
        self.wait(|reply| Job::DevicesChanged {
            user,
            added,
            removed,
            reply,
        })
        .await
    }
}

// The connection's calls (`crate::conn`).

fn service(shard: &Shard) -> Result<&KeyService, ApiError> {
    shard.shared.keys.as_ref().ok_or_else(stopped)
}

/// UploadKeys from `p`'s connection.
///
/// # Errors
/// See [`KeyService::upload`].
pub async fn upload(
    shard: &Shard,
    p: Principal,
    req: v1::UploadKeys,
) -> Result<v1::PrekeyCount, ApiError> {
    service(shard)?.upload(p, req).await
}

/// FetchKeyBundles from `p`'s connection.
///
/// # Errors
/// See [`KeyService::fetch`].
pub async fn fetch(
    shard: &Shard,
    p: Principal,
    req: v1::FetchKeyBundles,
) -> Result<v1::KeyBundles, ApiError> {
    service(shard)?.fetch(p, req).await
}

/// A sign-in created `p`'s device: its user and peers are told (not awaited: nothing of it is
/// stored).
pub fn device_added(shard: &Shard, p: Option<Principal>) {
    if let (Some(keys), Some(p)) = (shard.shared.keys.as_ref(), p) {
        let _ = keys.submit(|reply| Job::DevicesChanged {
            user: p.user_id,
            added: vec![p.device_id],
            removed: Vec::new(),
            reply,
        });
    }
}

/// `user`'s `device` was removed: its keys are deleted (durably, before this returns) and its
/// user and peers are told.
///
/// # Errors
/// See [`KeyService::devices_changed`].
pub async fn device_removed(shard: &Shard, user: u64, device: u32) -> Result<(), ApiError> {
    match shard.shared.keys.as_ref() {
        Some(keys) => keys.devices_changed(user, Vec::new(), vec![device]).await,
        None => Ok(()),
    }
}

fn stopped() -> ApiError {
    ApiError::new(
        ErrorCode::Unavailable,
        "the key directory stopped; retry later",
    )
}

fn storage_failure(what: &str, e: &StorageError) -> ApiError {
    tracing::warn!(error = %e, "key directory: {what}");
    ApiError::new(
        ErrorCode::StorageFailure,
        format!("{what} failed in storage; nothing was changed, retry"),
    )
}

// ---------------------------------------------------------------------------------------------
// the writer thread

struct Writer {
    meta: Arc<EmbeddedMeta>,
    dir: KeyDirectory<EmbeddedMeta>,
    controls: Vec<mpsc::Sender<Control>>,
    batch_max: usize,
}

/// Answers waiting for the open batch's commit.
#[derive(Default)]
struct Waiting {
    fetches: Vec<(Reply<Result<v1::KeyBundles, ApiError>>, v1::KeyBundles)>,
    low: Vec<LowStock>,
}

impl Writer {
    fn run(mut self, rx: &Receiver<Job>) {
        let mut jobs = Vec::with_capacity(self.batch_max);
        while let Ok(first) = rx.recv() {
            jobs.push(first);
            while jobs.len() < self.batch_max {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            let mut waiting = Waiting::default();
            for job in jobs.drain(..) {
                self.job(job, &mut waiting);
            }
            self.settle(&mut waiting);
        }
    }

    fn job(&mut self, job: Job, waiting: &mut Waiting) {
        match job {
            // A listing takes nothing: answered now, without waiting for a commit.
            Job::Fetch { p, req, reply } if req.list_only => reply.send(self.list(p, &req)),
            Job::Fetch { p, req, reply } => match self.fetch(p, &req) {
                Ok((bundles, low)) => {
                    waiting.fetches.push((reply, bundles));
                    waiting.low.extend(low);
                }
                Err(e) => reply.send(Err(e)),
            },
            Job::Upload { p, req, reply } => {
                // On its own commit: the fetches before it first.
                self.settle(waiting);
                let r = self.upload(p, &req);
                reply.send(r);
            }
            Job::DevicesChanged {
                user,
                added,
                removed,
                reply,
            } => {
                self.settle(waiting);
                reply.send(self.devices_changed(user, added, removed));
            }
        }
    }

    /// Commits the open batch, then answers what waited for it and sends the low-stock pushes.
    fn settle(&mut self, waiting: &mut Waiting) {
        if waiting.fetches.is_empty() && !self.dir.has_pending() {
            return;
        }
        match self.dir.commit() {
            Ok(()) => {
                for (reply, bundles) in waiting.fetches.drain(..) {
                    reply.send(Ok(bundles));
                }
                for l in waiting.low.drain(..) {
                    let body = Body::PrekeyCount(v1::PrekeyCount {
                        one_time_prekeys: l.remaining,
                    });
                    self.push(Push::new(vec![l.user.0], Some(l.device.0), body));
                }
            }
            Err(e) => {
                let err = storage_failure("taking one-time prekeys", &e);
                for (reply, _) in waiting.fetches.drain(..) {
                    reply.send(Err(err.clone()));
                }
                waiting.low.clear();
            }
        }
    }

    /// Checks a FetchKeyBundles and whether `p` may see its user (`None`: answer nothing).
    fn fetch_target(
        &self,
        p: Principal,
        req: &v1::FetchKeyBundles,
    ) -> Result<Option<UserId>, ApiError> {
        if req.user_id == 0 {
            return Err(ApiError::new(ErrorCode::InvalidArgument, "user id 0"));
        }
        if req.device_ids.len() > FETCH_DEVICE_IDS_MAX {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                format!("at most {FETCH_DEVICE_IDS_MAX} device ids per FetchKeyBundles"),
            ));
        }
        let target = UserId(req.user_id);
        let visible =
            starling_router::visibility::visible(&*self.meta, UserId(p.user_id), &[target])
                .map_err(|e| storage_failure("checking who may fetch", &e))?;
        Ok((visible.first() == Some(&true)).then_some(target))
    }

    /// A list_only FetchKeyBundles: the bundles without one-time prekeys, nothing taken.
    fn list(
        &mut self,
        p: Principal,
        req: &v1::FetchKeyBundles,
    ) -> Result<v1::KeyBundles, ApiError> {
        let Some(target) = self.fetch_target(p, req)? else {
            return Ok(v1::KeyBundles::default());
        };
        let bundles = self
            .dir
            .list(target, &req.device_ids)
            .map_err(|e| storage_failure("reading key bundles", &e))?;
        Ok(v1::KeyBundles {
            bundles: bundles.into_iter().map(wire_bundle).collect(),
        })
    }

    fn fetch(
        &mut self,
        p: Principal,
        req: &v1::FetchKeyBundles,
    ) -> Result<(v1::KeyBundles, Vec<LowStock>), ApiError> {
        let Some(target) = self.fetch_target(p, req)? else {
            return Ok((v1::KeyBundles::default(), Vec::new()));
        };
        let (bundles, low) = self
            .dir
            .fetch(target, &req.device_ids)
            .map_err(|e| storage_failure("reading key bundles", &e))?;
        let bundles = bundles.into_iter().map(wire_bundle).collect();
        Ok((v1::KeyBundles { bundles }, low))
    }

    fn upload(&mut self, p: Principal, req: &v1::UploadKeys) -> Result<v1::PrekeyCount, ApiError> {
        let up = Upload {
            identity_key: req.identity_key.to_vec(),
            registration_id: req.registration_id,
            signed_prekey: req
                .signed_prekey
                .as_ref()
                .map(|s| (s.key_id, s.public_key.to_vec(), s.signature.to_vec())),
            one_time_prekeys: req
                .one_time_prekeys
                .iter()
                .map(|k| (k.key_id, k.public_key.to_vec()))
                .collect(),
        };
        let (user, device) = (UserId(p.user_id), DeviceId(p.device_id));
        let now = TimestampMs(clock::unix_ms());
        let count = self
            .dir
            .upload(user, device, &up, now, verify_signed_prekey)
            .map_err(|e| match e {
                KeyError::Invalid(m) => ApiError::new(ErrorCode::InvalidArgument, m),
                KeyError::AlreadyExists(m) => ApiError::new(ErrorCode::AlreadyExists, m),
                KeyError::Storage(e) => storage_failure("UploadKeys", &e),
            })?;
        self.dir
            .commit()
            .map_err(|e| storage_failure("UploadKeys", &e))?;
        Ok(v1::PrekeyCount {
            one_time_prekeys: count,
        })
    }

    fn devices_changed(
        &mut self,
        user: u64,
        added: Vec<u32>,
        removed: Vec<u32>,
    ) -> Result<(), ApiError> {
        for &d in &removed {
            self.dir
                .remove_device(UserId(user), DeviceId(d))
                .map_err(|e| storage_failure("deleting a removed device's keys", &e))?;
        }
        self.dir
            .commit()
            .map_err(|e| storage_failure("deleting a removed device's keys", &e))?;
        // The push is best effort: the change itself is already durable.
        match peers(&*self.meta, UserId(user), PEER_CONVS_MAX, PEERS_MAX) {
            Ok((users, cut)) => {
                if cut {
                    tracing::warn!(
                        user,
                        told = users.len(),
                        "device list change: told the users of at most {PEER_CONVS_MAX} \
                         conversations and at most {PEERS_MAX} users; the others learn of it \
                         when they next fetch key bundles"
                    );
                }
                let body = Body::DeviceListChanged(v1::DeviceListChanged {
                    user_id: user,
                    added_device_ids: added,
                    removed_device_ids: removed,
                });
                self.push(Push::new(users, None, body));
            }
            Err(e) => tracing::warn!(user, error = %e, "device list change: finding the peers"),
        }
        Ok(())
    }

    fn push(&self, push: Option<Push>) {
        let Some(push) = push else { return };
        let push = Arc::new(push);
        for c in &self.controls {
            let _ = c.send(Control::Push(push.clone()));
        }
    }
}

/// The user and everyone sharing a conversation (direct or group) with them, sorted: from at
/// most `convs_max` of the user's conversations and at most `peers_max` users (the limits the
/// `.proto` states on `DeviceListChanged`), and whether the limits left anyone out.
fn peers<M: MetadataStore>(
    meta: &M,
    user: UserId,
    convs_max: usize,
    peers_max: usize,
) -> Result<(Vec<u64>, bool), StorageError> {
    let mut out = BTreeSet::from([user.0]);
    // One more than the limit: whether there are more.
    let convs = meta.scan::<MemberOf>(&keys::user(user), convs_max + 1)?;
    let mut cut = convs.len() > convs_max;
    'convs: for m in convs.iter().take(convs_max) {
        for member in meta.scan::<Member>(&m.group.0.to_be_bytes(), peers_max + 1)? {
            if out.len() >= peers_max && !out.contains(&member.user.0) {
                cut = true;
                break 'convs;
            }
            out.insert(member.user.0);
        }
    }
    Ok((out.into_iter().collect(), cut))
}

/// Whether `signature` is identity key `identity`'s Ed25519 signature of `public_key`.
fn verify_signed_prekey(identity: &[u8], public_key: &[u8], signature: &[u8]) -> bool {
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, identity)
        .verify(public_key, signature)
        .is_ok()
}

fn wire_bundle(b: Bundle) -> v1::KeyBundle {
    v1::KeyBundle {
        user_id: b.identity.user.0,
        device_id: b.identity.device.0,
        registration_id: b.identity.registration_id,
        identity_key: b.identity.identity_key.into(),
        signed_prekey: Some(v1::SignedPrekey {
            key_id: b.signed.id,
            public_key: b.signed.public_key.into(),
            signature: b.signed.signature.into(),
        }),
        one_time_prekey: b.one_time.map(|k| v1::OneTimePrekey {
            key_id: k.id,
            public_key: k.public_key.into(),
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// a one-shot answer from the writer thread to a connection task

struct Slot<T> {
    value: Option<T>,
    waker: Option<Waker>,
    /// The reply was sent or dropped.
    done: bool,
}

fn channel<T>() -> (Reply<T>, Answer<T>) {
    let slot = Arc::new(Mutex::new(Slot {
        value: None,
        waker: None,
        done: false,
    }));
    (Reply(Some(slot.clone())), Answer(slot))
}

/// The writer's end: [`Reply::send`] once; dropped unsent, the waiter gets `None`.
struct Reply<T>(Option<Arc<Mutex<Slot<T>>>>);

impl<T> std::fmt::Debug for Reply<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reply")
    }
}

impl<T> Reply<T> {
    fn send(mut self, v: T) {
        if let Some(slot) = self.0.take() {
            finish(&slot, Some(v));
        }
    }
}

impl<T> Drop for Reply<T> {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            finish(&slot, None);
        }
    }
}

fn finish<T>(slot: &Mutex<Slot<T>>, v: Option<T>) {
    let waker = {
        let mut s = slot.lock().unwrap_or_else(PoisonError::into_inner);
        s.value = v;
        s.done = true;
        s.waker.take()
    };
    if let Some(w) = waker {
        w.wake();
    }
}

/// The connection's end: resolves to the answer, or `None` if the writer dropped the request.
#[must_use = "an answer is only seen by awaiting it"]
pub struct Answer<T>(Arc<Mutex<Slot<T>>>);

impl<T> Future for Answer<T> {
    type Output = Option<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut s = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if s.done {
            return Poll::Ready(s.value.take());
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl<T> std::fmt::Debug for Answer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Answer")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_change_reaches_the_peers_within_the_stated_limits_and_says_when_cut() {
        use starling_storage::meta::Role;
        use starling_storage::{ConvId, MemMeta, MetaBatch};
        let meta = MemMeta::default();
        let mut b = MetaBatch::default();
        // User 1 is in 3 conversations of 3 members each: 1 with 10+c and 20+c.
        for c in 0..3u64 {
            let conv = ConvId(u128::from(100 + c));
            for u in [1, 10 + c, 20 + c] {
                b.put(&Member {
                    group: conv,
                    user: UserId(u),
                    role: Role::Member,
                    joined_ms: TimestampMs(1),
                    joined_seq: Some(1),
                });
            }
            b.put(&MemberOf {
                user: UserId(1),
                group: conv,
            });
        }
        meta.commit(&b).unwrap();
        let all = vec![1, 10, 11, 12, 20, 21, 22];
        assert_eq!(
            peers(&meta, UserId(1), 3, 100).unwrap(),
            (all.clone(), false)
        );
        assert_eq!(peers(&meta, UserId(1), 3, 7).unwrap(), (all, false));
        // Fewer conversations read than the user has: cut, and said.
        let (some, cut) = peers(&meta, UserId(1), 2, 100).unwrap();
        assert!(cut && some == [1, 10, 11, 20, 21], "{some:?}");
        // Fewer users than there are: cut at the limit, and said.
        let (some, cut) = peers(&meta, UserId(1), 3, 4).unwrap();
        assert!(cut && some.len() == 4 && some.contains(&1), "{some:?}");
    }

    #[test]
    fn ed25519_signatures_of_the_signed_prekey_are_checked() {
        use ring::signature::KeyPair as _;
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let kp = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let prekey = [9u8; 32];
        let sig = kp.sign(&prekey);
        let id = kp.public_key().as_ref();
        assert!(verify_signed_prekey(id, &prekey, sig.as_ref()));
        assert!(!verify_signed_prekey(id, &[8u8; 32], sig.as_ref()));
        let mut bad = sig.as_ref().to_vec();
        bad[0] ^= 1;
        assert!(!verify_signed_prekey(id, &prekey, &bad));
    }

    #[test]
    fn answers_arrive_or_say_dropped() {
        let (reply, answer) = channel::<u32>();
        reply.send(5);
        assert_eq!(futures_lite_block_on(answer), Some(5));
        let (reply, answer) = channel::<u32>();
        drop(reply);
        assert_eq!(futures_lite_block_on(answer), None);
    }

    /// Polls a future that is already resolved.
    fn futures_lite_block_on<F: Future>(f: F) -> F::Output {
        let mut f = std::pin::pin!(f);
        let mut cx = Context::from_waker(Waker::noop());
        match f.as_mut().poll(&mut cx) {
            Poll::Ready(v) => v,
            Poll::Pending => panic!("not ready"),
        }
    }
}
