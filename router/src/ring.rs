//! Bounded single-producer/single-consumer rings between shards, with one
//! wake-up per published batch.
//!
//! Each pair of shards (p → c) has its own ring; the consumer shard owns one
//! [`Bell`] shared by all rings that feed it. A producer [`push`]es any
//! number of items (invisible to the consumer), then [`publish`]es them with
//! one release store, and tells the bell with one atomic swap; the doorbell
//! (an eventfd in the gateway) rings only if the consumer was asleep — at
//! most one wake-up per published batch.
//!
//! The bell is one atomic with three states, changed only by read-modify-
//! writes (so they are totally ordered without fences):
//! - the consumer calls [`Bell::begin_drain`] (→ `RUNNING`), drains every
//!   ring, then [`Bell::try_park`] (`RUNNING` → `SLEEPING`, compare-exchange)
//!   and waits on its doorbell only if that succeeded;
//! - a producer, after publishing, swaps in `NOTIFIED` and rings the
//!   doorbell if it replaced `SLEEPING` ([`Bell::notify`]). Producers that
//!   are not rings (the log's durability progress, offloaded jobs) call it
//!   too, so the doorbell is the consumer's only wake-up source and it never
//!   reads it before sleeping.
//!
//! If a publish lands after the consumer drained, either its swap sees
//! `SLEEPING` (and rings) or the consumer's compare-exchange sees `NOTIFIED`
//! (and drains again, seeing the new tail through the swap's release). No
//! wake-up can be lost; `loom` checks this (see `loom_tests` below, run with
//! `--cfg loom`).
//!
//! A full ring is backpressure, never growth: `push` hands the item back.
//!
//! [`push`]: Producer::push
//! [`publish`]: Producer::publish

// Safety argument for the whole module: slot `i` is written only by the
// producer while `i` is in [tail, head + capacity) — i.e. not yet published
// and not readable by the consumer — and read only by the consumer while `i`
// is in [head, published tail). The acquire/release pairs on `tail`
// (publish → pop) and `head` (pop → push) order those accesses, so a slot is
// never accessed by both sides at once and is read only after it was
// initialized. Each initialized slot is moved out exactly once (by `pop` or
// by `Ring::drop`).
#![allow(unsafe_code)]

use std::fmt;
use std::mem::MaybeUninit;

use crate::sync::{Arc, AtomicBool, AtomicUsize, Ordering, UnsafeCell};

/// Wakes a parked consumer shard (an eventfd write, a thread unpark, ...).
pub trait Doorbell: Send + Sync {
    /// Wakes the consumer. Called at most once per publish, and only when
    /// the consumer was about to sleep.
    fn ring(&self);
}

const RUNNING: usize = 0;
const SLEEPING: usize = 1;
const NOTIFIED: usize = 2;

/// A consumer shard's sleep state and doorbell, shared by every ring feeding
/// that shard.
pub struct Bell {
    state: AtomicUsize,
    doorbell: Box<dyn Doorbell>,
}

impl fmt::Debug for Bell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bell")
            .field("state", &self.state.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Bell {
    /// A bell that rings `doorbell`.
    pub fn new(doorbell: impl Doorbell + 'static) -> Arc<Self> {
        Arc::new(Self {
            state: AtomicUsize::new(RUNNING),
            doorbell: Box::new(doorbell),
        })
    }

    /// The consumer is about to drain its rings (call before every pass).
    pub fn begin_drain(&self) {
        self.state.swap(RUNNING, Ordering::AcqRel);
    }

    /// The consumer drained every ring and wants to sleep. Returns true if
    /// it may now wait on its doorbell; false if something was published
    /// since [`begin_drain`](Self::begin_drain) (drain again).
    #[must_use]
    pub fn try_park(&self) -> bool {
        self.state
            .compare_exchange(RUNNING, SLEEPING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Called by a producer after it published (a ring's batch or close, the log's durability
    /// progress, a finished offloaded job): wakes the consumer if it is parked, and otherwise
    /// makes its next [`try_park`](Self::try_park) fail so that it looks again. Publish what the
    /// consumer is to see before calling. The doorbell rings only when the consumer was asleep,
    /// so a busy consumer costs its producers no system call and itself no empty eventfd read.
    /// Returns whether it rang.
    pub fn notify(&self) -> bool {
        if self.state.swap(NOTIFIED, Ordering::AcqRel) == SLEEPING {
            self.doorbell.ring();
            true
        } else {
            false
        }
    }
}

struct Ring<T> {
    slots: Box<[UnsafeCell<MaybeUninit<T>>]>,
    mask: usize,
    /// Next slot the consumer reads. Written by the consumer only.
    head: AtomicUsize,
    /// One past the last published slot. Written by the producer only.
    tail: AtomicUsize,
    /// Either side was dropped.
    closed: AtomicBool,
    bell: Arc<Bell>,
}

// Safety: the ring moves `T`s between exactly two threads; see the module's
// safety argument. `T: Send` is all that moving values across threads needs.
unsafe impl<T: Send> Send for Ring<T> {}
// Safety: shared access is split by index ranges between the one producer
// and the one consumer (module safety argument).
unsafe impl<T: Send> Sync for Ring<T> {}

impl<T> Drop for Ring<T> {
    fn drop(&mut self) {
        let head = self.head.load(Ordering::Acquire);
        let tail = self.tail.load(Ordering::Acquire);
        for i in head..tail {
            self.slots[i & self.mask].with_mut(|slot| {
                // Safety: slots in [head, tail) were published and not yet
                // read; both handles are gone, so nobody else touches them.
                unsafe { (*slot).assume_init_drop() }
            });
        }
    }
}

/// Why [`Producer::push`] handed the item back.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError<T> {
    /// The ring is full: stop feeding it (stop reading the sockets that
    /// produce for it) until the consumer catches up.
    Full(T),
    /// The consumer is gone.
    Closed(T),
}

/// The sending end of one ring.
pub struct Producer<T> {
    ring: Arc<Ring<T>>,
    /// Next slot to write (items in [published, tail) are unpublished).
    tail: usize,
    published: usize,
    /// Last head seen; refreshed only when the ring looks full.
    head_cache: usize,
}

/// The receiving end of one ring.
pub struct Consumer<T> {
    ring: Arc<Ring<T>>,
    head: usize,
    /// Last tail seen; refreshed only when the ring looks empty.
    tail_cache: usize,
}

impl<T> fmt::Debug for Producer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("tail", &self.tail)
            .field("published", &self.published)
            .finish_non_exhaustive()
    }
}

impl<T> fmt::Debug for Consumer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("head", &self.head)
            .finish_non_exhaustive()
    }
}

/// A ring of `capacity` slots (rounded up to a power of two, at least 2)
/// that wakes `bell`'s consumer.
#[must_use]
pub fn ring<T>(capacity: usize, bell: Arc<Bell>) -> (Producer<T>, Consumer<T>) {
    let capacity = capacity.max(2).next_power_of_two();
    let slots = (0..capacity)
        .map(|_| UnsafeCell::new(MaybeUninit::uninit()))
        .collect();
    let ring = Arc::new(Ring {
        slots,
        mask: capacity - 1,
        head: AtomicUsize::new(0),
        tail: AtomicUsize::new(0),
        closed: AtomicBool::new(false),
        bell,
    });
    (
        Producer {
            ring: ring.clone(),
            tail: 0,
            published: 0,
            head_cache: 0,
        },
        Consumer {
            ring,
            head: 0,
            tail_cache: 0,
        },
    )
}

impl<T> Producer<T> {
    /// Slots in the ring.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.ring.mask + 1
    }

    /// Queues `item`; it becomes visible at the next [`publish`](Self::publish).
    pub fn push(&mut self, item: T) -> Result<(), PushError<T>> {
        if self.ring.closed.load(Ordering::Relaxed) {
            return Err(PushError::Closed(item));
        }
        if self.tail - self.head_cache == self.capacity() {
            self.head_cache = self.ring.head.load(Ordering::Acquire);
            if self.tail - self.head_cache == self.capacity() {
                return Err(PushError::Full(item));
            }
        }
        self.ring.slots[self.tail & self.ring.mask].with_mut(|slot| {
            // Safety: `tail` is outside [head, published tail): the consumer
            // does not read this slot, and its previous value was moved out
            // (the acquire load of `head` above ordered that read before
            // this write).
            unsafe { (*slot).write(item) };
        });
        self.tail += 1;
        Ok(())
    }

    /// Items pushed but not yet published.
    #[must_use]
    pub fn unpublished(&self) -> usize {
        self.tail - self.published
    }

    /// Makes every pushed item visible to the consumer, and wakes it if it
    /// is parked. Returns whether the doorbell rang.
    pub fn publish(&mut self) -> bool {
        if self.tail == self.published {
            return false;
        }
        self.published = self.tail;
        // Release: the slots written by `push` happen-before a pop that
        // sees this tail (directly, or through the bell's swap).
        self.ring.tail.store(self.tail, Ordering::Release);
        self.ring.bell.notify()
    }

    /// True once the consumer has been dropped.
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.ring.closed.load(Ordering::Relaxed)
    }
}

impl<T> Drop for Producer<T> {
    fn drop(&mut self) {
        self.publish();
        self.ring.closed.store(true, Ordering::Release);
        // A parked consumer must learn that this ring closed.
        self.ring.bell.notify();
    }
}

impl<T> Consumer<T> {
    /// Takes the oldest published item, if any.
    pub fn pop(&mut self) -> Option<T> {
        if self.head == self.tail_cache {
            self.tail_cache = self.ring.tail.load(Ordering::Acquire);
            if self.head == self.tail_cache {
                return None;
            }
        }
        let item = self.ring.slots[self.head & self.ring.mask].with(|slot| {
            // Safety: `head` is in [head, published tail): the producer
            // initialized this slot before its release store of `tail`, which
            // the acquire load above observed, and will not touch it again
            // until `head` moves past it.
            unsafe { (*slot).assume_init_read() }
        });
        self.head += 1;
        self.ring.head.store(self.head, Ordering::Release);
        Some(item)
    }

    /// True when no published item is waiting.
    #[must_use]
    pub fn is_empty(&mut self) -> bool {
        self.tail_cache = self.ring.tail.load(Ordering::Acquire);
        self.head == self.tail_cache
    }

    /// True when the producer is gone and every item has been taken.
    #[must_use]
    pub fn is_finished(&mut self) -> bool {
        self.ring.closed.load(Ordering::Acquire) && self.is_empty()
    }
}

impl<T> Drop for Consumer<T> {
    fn drop(&mut self) {
        self.ring.closed.store(true, Ordering::Release);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize as StdAtomicUsize;

    #[derive(Default)]
    struct Count(StdAtomicUsize);

    impl Doorbell for Arc<Count> {
        fn ring(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn fifo_backpressure_and_batches() {
        let rings = Arc::new(Count::default());
        let bell = Bell::new(rings.clone());
        let (mut p, mut c) = ring::<u32>(3, bell.clone());
        assert_eq!(p.capacity(), 4);
        for i in 0..4 {
            p.push(i).unwrap();
        }
        assert_eq!(p.push(9), Err(PushError::Full(9)));
        // Nothing is visible before publish.
        assert_eq!(c.pop(), None);
        // Consumer not parked: publishing does not ring.
        assert!(!p.publish());
        assert_eq!(c.pop(), Some(0));
        p.push(4).unwrap();
        bell.begin_drain();
        assert!(bell.try_park());
        assert!(p.publish(), "a parked consumer is woken once per batch");
        assert!(!p.publish(), "nothing new: no second wake-up");
        assert_eq!(rings.0.load(Ordering::SeqCst), 1);
        let got: Vec<u32> = std::iter::from_fn(|| c.pop()).collect();
        assert_eq!(got, [1, 2, 3, 4]);
    }

    #[test]
    fn close_either_side() {
        let bell = Bell::new(Arc::new(Count::default()));
        let (mut p, c) = ring::<String>(2, bell.clone());
        drop(c);
        assert!(p.is_closed());
        assert_eq!(p.push("x".into()), Err(PushError::Closed("x".into())));

        let (mut p, mut c) = ring::<String>(2, bell);
        p.push("a".into()).unwrap();
        drop(p); // publishes what was pushed
        assert!(!c.is_finished());
        assert_eq!(c.pop().as_deref(), Some("a"));
        assert!(c.is_finished());
    }

    #[test]
    fn notify_rings_a_parked_consumer_once_and_makes_a_running_one_look_again() {
        let rings = Arc::new(Count::default());
        let bell = Bell::new(rings.clone());
        // Running: no ring, but the next park fails so the consumer drains again.
        bell.begin_drain();
        bell.notify();
        assert_eq!(rings.0.load(Ordering::SeqCst), 0);
        assert!(!bell.try_park());
        // Parked: the first notify rings, the ones after it until the next drain do not.
        bell.begin_drain();
        assert!(bell.try_park());
        bell.notify();
        bell.notify();
        assert_eq!(rings.0.load(Ordering::SeqCst), 1);
        bell.begin_drain();
        assert!(bell.try_park());
        bell.notify();
        assert_eq!(rings.0.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn unread_items_are_dropped_with_the_ring() {
        let item = Arc::new(());
        let bell = Bell::new(Arc::new(Count::default()));
        let (mut p, c) = ring::<Arc<()>>(4, bell);
        p.push(item.clone()).unwrap();
        p.push(item.clone()).unwrap();
        p.publish();
        assert_eq!(Arc::strong_count(&item), 3);
        drop((p, c));
        assert_eq!(Arc::strong_count(&item), 1);
    }

    /// A real two-thread run with a parking consumer: every item arrives
    /// once, in order, and the consumer never sleeps through a publish.
    #[test]
    fn threads_with_parking() {
        struct Park(Arc<(Mutex<bool>, std::sync::Condvar)>);
        impl Doorbell for Park {
            fn ring(&self) {
                let (lock, cv) = &*self.0;
                *lock.lock().unwrap() = true;
                cv.notify_one();
            }
        }
        let park = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let bell = Bell::new(Park(park.clone()));
        let (mut p, mut c) = ring::<u64>(64, bell.clone());
        const N: u64 = 200_000;
        let producer = std::thread::spawn(move || {
            let mut i = 0;
            while i < N {
                match p.push(i) {
                    Ok(()) => i += 1,
                    Err(PushError::Full(_)) => {
                        p.publish();
                        std::thread::yield_now();
                    }
                    Err(PushError::Closed(_)) => panic!("consumer gone"),
                }
                if i % 7 == 0 {
                    p.publish();
                }
            }
        });
        let mut next = 0;
        loop {
            bell.begin_drain();
            while let Some(v) = c.pop() {
                assert_eq!(v, next);
                next += 1;
            }
            if c.is_finished() {
                break;
            }
            if !bell.try_park() {
                continue;
            }
            let (lock, cv) = &*park;
            let mut rung = lock.lock().unwrap();
            while !*rung {
                rung = cv.wait(rung).unwrap();
            }
            *rung = false;
        }
        producer.join().unwrap();
        assert_eq!(next, N);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::{Condvar, Mutex};

    struct Park(Arc<(Mutex<bool>, Condvar)>);

    impl Doorbell for Park {
        fn ring(&self) {
            let (lock, cv) = &*self.0;
            *lock.lock().unwrap() = true;
            cv.notify_one();
        }
    }

    /// Consumer loop with the park protocol; returns what it received.
    fn consume(
        mut c: Consumer<u32>,
        bell: Arc<Bell>,
        park: Arc<(Mutex<bool>, Condvar)>,
    ) -> Vec<u32> {
        let mut got = Vec::new();
        loop {
            bell.begin_drain();
            while let Some(v) = c.pop() {
                got.push(v);
            }
            if c.is_finished() {
                return got;
            }
            if !bell.try_park() {
                continue;
            }
            // A lost wake-up deadlocks here, which loom reports.
            let (lock, cv) = &*park;
            let mut rung = lock.lock().unwrap();
            while !*rung {
                rung = cv.wait(rung).unwrap();
            }
            *rung = false;
        }
    }

    /// Bounded exploration: every interleaving with up to 3 preemptions
    /// (loom's recommended bound; the producer's retry loop on a full ring
    /// would otherwise make the space of schedules unbounded).
    fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(f);
    }

    #[test]
    fn push_publish_park_close() {
        model(|| {
            let park = Arc::new((Mutex::new(false), Condvar::new()));
            let bell = Bell::new(Park(park.clone()));
            let (mut p, c) = ring::<u32>(2, bell.clone());
            let consumer = loom::thread::spawn(move || consume(c, bell, park));
            // Two batches; the second may find the ring full (no retry
            // loop: a spin would make the schedule space unbounded).
            p.push(1).unwrap();
            p.push(2).unwrap();
            p.publish();
            let third = p.push(3);
            drop(p); // publish + close + wake
            let want = match third {
                Ok(()) => vec![1, 2, 3],
                Err(PushError::Full(3)) => vec![1, 2],
                Err(e) => panic!("unexpected {e:?}"),
            };
            assert_eq!(consumer.join().unwrap(), want);
        });
    }

    #[test]
    fn consumer_drop_drops_items_once() {
        model(|| {
            let park = Arc::new((Mutex::new(false), Condvar::new()));
            let bell = Bell::new(Park(park));
            let (mut p, mut c) = ring::<Arc<()>>(2, bell);
            let item = Arc::new(());
            p.push(item.clone()).unwrap();
            p.publish();
            let consumer = loom::thread::spawn(move || {
                let _ = c.pop();
            });
            let _ = p.push(item.clone());
            p.publish();
            consumer.join().unwrap();
            drop(p);
            assert_eq!(Arc::strong_count(&item), 1);
        });
    }

    /// Two producer shards feed one consumer shard through one bell.
    #[test]
    fn two_producers_one_bell() {
        model(|| {
            let park = Arc::new((Mutex::new(false), Condvar::new()));
            let bell = Bell::new(Park(park.clone()));
            let (mut pa, mut ca) = ring::<u32>(2, bell.clone());
            let (mut pb, mut cb) = ring::<u32>(2, bell.clone());
            let a = loom::thread::spawn(move || {
                pa.push(1).unwrap();
                pa.publish();
            });
            let b = loom::thread::spawn(move || {
                pb.push(2).unwrap();
                drop(pb);
            });
            let mut got = Vec::new();
            loop {
                bell.begin_drain();
                got.extend(std::iter::from_fn(|| ca.pop()));
                got.extend(std::iter::from_fn(|| cb.pop()));
                if ca.is_finished() && cb.is_finished() {
                    break;
                }
                if !bell.try_park() {
                    continue;
                }
                let (lock, cv) = &*park;
                let mut rung = lock.lock().unwrap();
                while !*rung {
                    rung = cv.wait(rung).unwrap();
                }
                *rung = false;
            }
            a.join().unwrap();
            b.join().unwrap();
            got.sort_unstable();
            assert_eq!(got, vec![1, 2]);
        });
    }
}
