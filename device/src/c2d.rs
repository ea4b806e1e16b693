//! Cloud-to-device settlement as IoT Hub defines it, for one device's queue.
//!
//! Messages come in (read from the store) in order; [`Deliveries::poll`]
//! hands out the next one with a fresh lock token and its delivery count,
//! or says that the one at the front expired or has been delivered too
//! often (dead-lettered). The protocol head settles each lock: complete and
//! reject remove the message, abandon puts it back at its place in the
//! order (it goes again, its count one higher), and a lost link abandons
//! everything it held. A lock not settled within the caller's lock duration
//! is taken back and offered again without counting (silence is not a
//! failed delivery). No I/O and no clock: times are passed in.

use std::collections::{BTreeMap, VecDeque};

/// IoT Hub's default maximum delivery count.
pub const DEFAULT_MAX_DELIVERY_COUNT: u32 = 10;

/// One delivery attempt of one message (unique for the queue's lifetime).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LockToken(pub u64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettleError {
    /// IoT Hub's DeviceMessageLockLost: settled already, taken back when its
    /// lock ran out, or never handed out.
    #[error("lock token {0} is unknown or was already settled")]
    LockLost(u64),
}

/// What the caller should do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Action<M> {
    /// Deliver `message` under `lock`; `delivery_count` counts this attempt.
    Deliver {
        lock: LockToken,
        delivery_count: u32,
        message: M,
    },
    /// Its time-to-live passed before it was completed: remove it.
    Expired(M),
    /// Delivered the maximum number of times without being completed:
    /// remove it and count it as dead-lettered.
    DeadLettered(M),
}

struct Pending<M> {
    seq: u64,
    expires_at_ms: u64,
    /// Delivery attempts so far.
    delivered: u32,
    message: M,
}

struct Locked<M> {
    pending: Pending<M>,
    at_ms: u64,
}

/// One device's messages on their way: waiting in order, or locked by a
/// delivery that is not settled yet.
pub struct Deliveries<M> {
    /// `None`: delivered until completed, however often (module inputs).
    max_delivery_count: Option<u32>,
    next_lock: u64,
    waiting: VecDeque<Pending<M>>,
    locked: BTreeMap<LockToken, Locked<M>>,
}

impl<M> Deliveries<M> {
    pub fn new(max_delivery_count: Option<u32>) -> Deliveries<M> {
        Deliveries {
            max_delivery_count,
            next_lock: 1,
            waiting: VecDeque::new(),
            locked: BTreeMap::new(),
        }
    }

    /// A message from the store, in store order (`seq` ascending).
    /// `expires_at_ms` 0 = never.
    pub fn push(&mut self, seq: u64, expires_at_ms: u64, message: M) {
        self.insert(Pending {
            seq,
            expires_at_ms,
            delivered: 0,
            message,
        });
    }

    /// Back at its place in the order (after an abandon).
    fn insert(&mut self, p: Pending<M>) {
        let at = self.waiting.partition_point(|w| w.seq < p.seq);
        self.waiting.insert(at, p);
    }

    /// Messages not yet settled (waiting or locked).
    pub fn len(&self) -> usize {
        self.waiting.len() + self.locked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `lock` is handed out and not settled (nor timed out).
    pub fn is_locked(&self, lock: LockToken) -> bool {
        self.locked.contains_key(&lock)
    }

    /// Deliveries handed out and not yet settled.
    pub fn locked(&self) -> usize {
        self.locked.len()
    }

    /// Delivery attempts so far of the message with store sequence `seq`
    /// (0 when it was never delivered or is not here).
    pub fn delivery_count(&self, seq: u64) -> u32 {
        self.waiting
            .iter()
            .map(|p| (p.seq, p.delivered))
            .chain(
                self.locked
                    .values()
                    .map(|l| (l.pending.seq, l.pending.delivered)),
            )
            .find(|(s, _)| *s == seq)
            .map_or(0, |(_, d)| d)
    }

    /// The next thing to do with the front of the queue, if anything.
    /// A delivered message stays here (locked) until it is settled; the
    /// caller gets a clone to send.
    pub fn poll(&mut self, now_ms: u64) -> Option<Action<M>>
    where
        M: Clone,
    {
        let mut front = self.waiting.pop_front()?;
        if front.expires_at_ms != 0 && front.expires_at_ms <= now_ms {
            return Some(Action::Expired(front.message));
        }
        if self
            .max_delivery_count
            .is_some_and(|max| front.delivered >= max)
        {
            return Some(Action::DeadLettered(front.message));
        }
        let lock = LockToken(self.next_lock);
        self.next_lock += 1;
        front.delivered += 1;
        let (delivery_count, message) = (front.delivered, front.message.clone());
        self.locked.insert(
            lock,
            Locked {
                pending: front,
                at_ms: now_ms,
            },
        );
        Some(Action::Deliver {
            lock,
            delivery_count,
            message,
        })
    }

    fn take(&mut self, lock: LockToken) -> Result<Pending<M>, SettleError> {
        self.locked
            .remove(&lock)
            .map(|l| l.pending)
            .ok_or(SettleError::LockLost(lock.0))
    }

    /// The device has it: the message goes.
    pub fn complete(&mut self, lock: LockToken) -> Result<M, SettleError> {
        self.take(lock).map(|p| p.message)
    }

    /// The device refuses it: the message goes (counted as rejected).
    pub fn reject(&mut self, lock: LockToken) -> Result<M, SettleError> {
        self.take(lock).map(|p| p.message)
    }

    /// The device gives it back: delivered again, its count one higher.
    pub fn abandon(&mut self, lock: LockToken) -> Result<(), SettleError> {
        let p = self.take(lock)?;
        self.insert(p);
        Ok(())
    }

    /// The delivery never reached a device (nobody to deliver to): back in
    /// place, and this attempt does not count.
    pub fn retract(&mut self, lock: LockToken) -> Result<(), SettleError> {
        let mut p = self.take(lock)?;
        p.delivered -= 1;
        self.insert(p);
        Ok(())
    }

    /// The link that held these deliveries went away: each is abandoned.
    pub fn link_lost(&mut self) {
        let all: Vec<LockToken> = self.locked.keys().copied().collect();
        for lock in all {
            let _ = self.abandon(lock);
        }
    }

    /// Takes back the deliveries locked for `lock_ms` or longer, to be
    /// offered again; returns how many. They do not count as failed
    /// deliveries: over MQTT a device that is offline with a persistent
    /// session still holds the message (its session delivers it when it
    /// returns), so silence is no evidence against the message, and a
    /// long absence must not dead-letter it. A lost link ([`link_lost`],
    /// [`abandon`]) is.
    ///
    /// [`link_lost`]: Deliveries::link_lost
    /// [`abandon`]: Deliveries::abandon
    pub fn expire_locks(&mut self, now_ms: u64, lock_ms: u64) -> usize {
        let old: Vec<LockToken> = self
            .locked
            .iter()
            .filter(|(_, l)| now_ms.saturating_sub(l.at_ms) >= lock_ms)
            .map(|(k, _)| *k)
            .collect();
        for lock in &old {
            let _ = self.retract(*lock);
        }
        old.len()
    }

    /// When the oldest lock was taken (unix ms), if any is held.
    pub fn oldest_lock_ms(&self) -> Option<u64> {
        self.locked.values().map(|l| l.at_ms).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(max: Option<u32>, n: u64) -> Deliveries<&'static str> {
        let mut d = Deliveries::new(max);
        const NAMES: [&str; 4] = ["m1", "m2", "m3", "m4"];
        for i in 0..n {
            d.push(i + 1, 0, NAMES[i as usize]);
        }
        d
    }

    fn deliver(d: &mut Deliveries<&'static str>, now: u64) -> (LockToken, u32, &'static str) {
        match d.poll(now) {
            Some(Action::Deliver {
                lock,
                delivery_count,
                message,
            }) => (lock, delivery_count, message),
            other => panic!("expected a delivery, got {other:?}"),
        }
    }

    #[test]
    fn complete_removes_in_order() {
        let mut d = queue(Some(10), 2);
        let (l1, c1, m1) = deliver(&mut d, 0);
        let (l2, _, m2) = deliver(&mut d, 0);
        assert_eq!((c1, m1, m2), (1, "m1", "m2"));
        assert_eq!(d.locked(), 2);
        assert_eq!(d.complete(l2), Ok("m2"));
        assert_eq!(d.complete(l1), Ok("m1"));
        assert!(d.is_empty());
        assert_eq!(d.poll(0), None);
        // Settling twice is IoT Hub's lock-lost error.
        assert_eq!(d.complete(l1), Err(SettleError::LockLost(l1.0)));
    }

    #[test]
    fn reject_removes_without_redelivery() {
        let mut d = queue(Some(10), 1);
        let (l, _, _) = deliver(&mut d, 0);
        assert_eq!(d.reject(l), Ok("m1"));
        assert!(d.is_empty());
        assert_eq!(d.abandon(l), Err(SettleError::LockLost(l.0)));
    }

    #[test]
    fn abandon_redelivers_in_place_with_a_higher_count_and_a_new_lock() {
        let mut d = queue(Some(10), 3);
        let (l1, _, _) = deliver(&mut d, 0);
        let (l2, _, _) = deliver(&mut d, 0);
        d.abandon(l2).unwrap();
        d.abandon(l1).unwrap();
        // Back in store order, not in abandon order.
        let (n1, c1, m1) = deliver(&mut d, 0);
        let (_, c2, m2) = deliver(&mut d, 0);
        let (_, c3, m3) = deliver(&mut d, 0);
        assert_eq!((m1, c1), ("m1", 2));
        assert_eq!((m2, c2), ("m2", 2));
        assert_eq!((m3, c3), ("m3", 1));
        assert_ne!(n1, l1, "every delivery has its own lock token");
        assert_eq!(d.complete(l1), Err(SettleError::LockLost(l1.0)));
        assert_eq!(d.delivery_count(1), 2);
    }

    #[test]
    fn maximum_delivery_count_dead_letters() {
        let mut d = queue(Some(3), 2);
        for attempt in 1..=3 {
            let (l, c, m) = deliver(&mut d, 0);
            assert_eq!((m, c), ("m1", attempt));
            d.abandon(l).unwrap();
        }
        // Delivered three times, never completed: dead-lettered, and the
        // next message goes on as usual.
        assert_eq!(d.poll(0), Some(Action::DeadLettered("m1")));
        let (_, c, m) = deliver(&mut d, 0);
        assert_eq!((m, c), ("m2", 1));
    }

    #[test]
    fn without_a_maximum_delivery_goes_on() {
        let mut d = queue(None, 1);
        for attempt in 1..=25 {
            let (l, c, _) = deliver(&mut d, 0);
            assert_eq!(c, attempt);
            d.abandon(l).unwrap();
        }
    }

    #[test]
    fn expired_messages_are_never_delivered() {
        let mut d = Deliveries::new(Some(10));
        d.push(1, 1_000, "old");
        d.push(2, 0, "forever");
        d.push(3, 5_000, "later");
        assert_eq!(d.poll(2_000), Some(Action::Expired("old")));
        let (l, _, m) = deliver(&mut d, 2_000);
        assert_eq!(m, "forever");
        d.complete(l).unwrap();
        // Abandoned, then its time passes before it goes again.
        let (l, _, _) = deliver(&mut d, 2_000);
        d.abandon(l).unwrap();
        assert_eq!(d.poll(6_000), Some(Action::Expired("later")));
        assert_eq!(d.poll(6_000), None);
    }

    #[test]
    fn a_lost_link_abandons_everything_it_held() {
        let mut d = queue(Some(10), 3);
        let (l1, _, _) = deliver(&mut d, 0);
        let (_, _, _) = deliver(&mut d, 0);
        d.complete(l1).unwrap();
        d.link_lost();
        assert_eq!(d.locked(), 0);
        let (_, c, m) = deliver(&mut d, 0);
        assert_eq!((m, c), ("m2", 2));
        let (_, c, m) = deliver(&mut d, 0);
        assert_eq!((m, c), ("m3", 1));
    }

    #[test]
    fn retract_does_not_count_and_locks_time_out() {
        let mut d = queue(Some(2), 1);
        let (l, _, _) = deliver(&mut d, 0);
        d.retract(l).unwrap();
        let (l, c, _) = deliver(&mut d, 100);
        assert_eq!(c, 1, "a retracted attempt is not a delivery");
        assert_eq!(d.oldest_lock_ms(), Some(100));
        assert_eq!(d.expire_locks(29_000, 30_000), 0);
        assert_eq!(d.expire_locks(30_100, 30_000), 1);
        assert_eq!(d.complete(l), Err(SettleError::LockLost(l.0)));
        // Offered again, not counted: however often the lock runs out, the
        // message is never dead-lettered for silence alone.
        for _ in 0..5 {
            let (_, c, _) = deliver(&mut d, 30_100);
            assert_eq!(c, 1);
            assert_eq!(d.expire_locks(60_200, 30_000), 1);
        }
        let (l, _, _) = deliver(&mut d, 60_200);
        d.abandon(l).unwrap();
        let (l, c, _) = deliver(&mut d, 60_200);
        assert_eq!(c, 2);
        d.abandon(l).unwrap();
        assert_eq!(d.poll(60_200), Some(Action::DeadLettered("m1")));
    }
}
