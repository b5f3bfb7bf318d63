//! The records of call state, and the store that holds them.
//!
//! The call rules ([`crate::machine`]) never hold state of their own: each
//! input reads the records it needs through a [`Txn`], changes copies of
//! them, and the result (a [`Transition`]: every record read with the
//! version it had, every record written, and the effects) is committed to a
//! [`Store`] in one step. Three kinds of record, keyed as a shared store
//! would key them:
//!
//! - a **user** ([`UserRec`]): its devices and its call;
//! - a **device** ([`DeviceRec`]): its user, the node holding its stream,
//!   the attachment epoch, attached or detached (and until when), its
//!   resume token, and the messages parked while it is detached;
//! - a **call** ([`Call`]): phase, parties, ringing devices, answering
//!   device, room, ring deadline, next notice sequence.
//!
//! Plus the notices of a call that ended while its approval was out, held
//! until the verdict (so the business service hears REQUEST first).
//!
//! Nothing in a record names a node-local object: devices are named by
//! [`ConnId`]s unique across nodes ([`ConnId::on`]), times are wall-clock
//! ([`crate::domain::Time`]), and room ids are checked against every live
//! call at commit. Timers, rooms and resume tokens are indexes the store
//! derives from the records it writes, so they can never disagree with
//! them.
//!
//! [`MemoryStore`] is the one-node store: plain maps, owned by the
//! switchboard actor, so a commit never conflicts.

use std::borrow::Borrow;
use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use crate::device::Outgoing;

/// The store's maps hash with foldhash, seeded at random per process: a
/// few times cheaper than SipHash on short keys (user ids, device ids),
/// on the path of every transition, and keys still cannot be chosen to
/// collide without knowing the seed.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
use crate::domain::{Call, CallId, ConnId, Effect, Notice, Phase, Time, UserId};

/// A record's version: 0 for a record that does not exist. Every commit
/// writes its records with one number from a store-wide sequence, so a
/// version never repeats for a key, even across a delete and a re-create.
pub type Version = u64;

/// Messages a detached device may have parked; one more and it is given up
/// (it counts as a slow consumer: see the switchboard).
pub const PARK_LIMIT: usize = 256;

/// A node of the cluster. Part of every [`ConnId`] it hands out.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct NodeId(pub u32);

impl ConnId {
    /// The `n`th device of `node`: 24 bits of node and 40 of counter, so
    /// ids from different nodes never meet (2^40 devices per node run).
    pub fn on(node: NodeId, n: u64) -> Self {
        ConnId((u64::from(node.0) << 40) | (n & ((1 << 40) - 1)))
    }

    /// The node that handed this id out.
    pub fn node(self) -> NodeId {
        NodeId((self.0 >> 40) as u32)
    }
}

/// A user: its devices and its call.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UserRec {
    pub devices: Vec<ConnId>,
    pub call: Option<CallId>,
}

/// A device of a user.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeviceRec {
    pub user: UserId,
    /// The node holding the device's stream (while attached) or that last
    /// held it.
    pub node: NodeId,
    /// Bumped each time a stream takes the device (first or resumed).
    pub epoch: u64,
    /// Whether a stream holds the device now.
    pub attached: bool,
    /// While detached: when the device is given up.
    pub until: Option<Time>,
    /// Single use: replaced on every resume.
    pub resume_token: Arc<str>,
    /// What was sent while detached, delivered on resume.
    pub parked: VecDeque<Outgoing>,
}

/// A timer the store keeps, derived from the records: due at its time,
/// the rules act on it ([`crate::machine::Machine::tick`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Timer {
    /// A call rings until then.
    Ring(CallId),
    /// A detached device is kept until then.
    Grace(ConnId),
}

/// What the rules read: each record with its version.
pub trait Records {
    fn user(&self, id: &str) -> Option<(Version, &UserRec)>;
    fn device(&self, id: ConnId) -> Option<(Version, &DeviceRec)>;
    fn call(&self, id: CallId) -> Option<(Version, &Call)>;
    fn held(&self, id: CallId) -> Option<(Version, &Vec<Notice>)>;
    /// The device a resume token names (an index the store keeps).
    fn device_by_token(&self, token: &str) -> Option<ConnId>;
    /// Whether a live call has this room.
    fn room_taken(&self, room: u32) -> bool;
    /// Where to start looking for a free room.
    fn room_hint(&self) -> u32;
    /// The last version the store wrote, if it knows it without a round
    /// trip: a commit that finds it unchanged since the transaction began
    /// has no version to check (nothing was written meanwhile).
    fn last_version(&self) -> Option<Version> {
        None
    }
}

/// A commit lost a race: a record read has changed since (or a room was
/// taken). Nothing was written; the input is run again from fresh records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a record changed under the transition")]
pub struct Conflict;

/// Where a message for one device went.
#[derive(Debug, PartialEq)]
pub enum Delivery {
    /// The device is attached: the node holding its stream delivers it.
    Attached(Outgoing),
    /// Parked for the device's resume.
    Parked,
    /// Parked, and more than it may hold: the device must be given up.
    Overflowed,
    /// No such device.
    Gone,
}

/// A store of call records.
///
/// **Atomic.** [`Store::commit`] applies a [`Transition`] whole or not at
/// all: it checks the version of every record the transition read (a
/// record read as absent must still be absent), writes every record it
/// changed, sets and clears the timers and room claims those records
/// imply, and routes the transition's effects: events for attached devices
/// come back to be delivered, events for detached devices are parked in
/// their records in the same step, approvals and notices come back for the
/// business service.
///
/// **Conflicts.** A changed version (or a room claimed meanwhile) fails the
/// commit with [`Conflict`] and writes nothing; the caller runs the input
/// again from fresh records ([`transact`] does, a bounded number of
/// times). A transition never reads its own effects, so running it again
/// is safe.
///
/// **Order.** Effects keep the order the rules gave them. Two transitions
/// that touch a common record are ordered by their commits, so the events
/// of one call (whose record every transition of the call writes) reach
/// each device, and the business service, in the order of the commits.
pub trait Store: Records {
    /// Commits `t` (leaving it empty, its buffers kept for the next) with
    /// the effects `effects[from..]`, routed in place: what is left there
    /// is for attached devices (in order) and the business service (in
    /// order). The detached devices that parked more than [`PARK_LIMIT`]
    /// come back: the node gives each up with a transition of its own.
    fn commit(
        &mut self,
        t: &mut Transition,
        effects: &mut Vec<Effect>,
        from: usize,
    ) -> Result<Vec<ConnId>, Conflict>;
    /// A message for one device, outside a transition (a control's result):
    /// delivered, parked or given up as [`Store::commit`] routes events.
    fn deliver(&mut self, conn: ConnId, msg: Outgoing) -> Delivery;
}

/// Commits a transition can lose in a row before the input is given up.
pub const MAX_ATTEMPTS: usize = 8;

/// Runs `rule` over fresh records and commits what it did, again from
/// fresh records on a conflict, at most [`MAX_ATTEMPTS`] times. The rule
/// pushes its effects to `out`; after the commit, `out` holds them as
/// routed (see [`Store::commit`]). `buf` lends its buffers to the
/// transaction, so a transition allocates nothing to keep its records.
/// The rule's value comes from the attempt that committed, with the devices
/// that overflowed; `None` if no attempt did (nothing was pushed to `out`).
pub fn transact<S: Store, T>(
    store: &mut S,
    buf: &mut Transition,
    out: &mut Vec<Effect>,
    mut rule: impl FnMut(&mut Txn<'_>, &mut Vec<Effect>) -> T,
) -> Option<(T, Vec<ConnId>)> {
    let from = out.len();
    for _ in 0..MAX_ATTEMPTS {
        let value = {
            let mut txn = Txn::reusing(store, std::mem::take(buf));
            let value = rule(&mut txn, out);
            *buf = txn.finish();
            value
        };
        match store.commit(buf, out, from) {
            Ok(overflowed) => return Some((value, overflowed)),
            Err(Conflict) => out.truncate(from),
        }
    }
    None
}

// ----- transactions --------------------------------------------------------

#[derive(Clone, Debug)]
pub(crate) struct Slot<K, V> {
    pub(crate) key: K,
    /// The version read (0: absent).
    pub(crate) read: Version,
    pub(crate) value: Option<V>,
    pub(crate) dirty: bool,
}

/// The records of one kind a transaction has touched. A transition touches
/// a handful, so a vector beats a map.
#[derive(Clone, Debug)]
struct Slots<K, V>(Vec<Slot<K, V>>);

impl<K, V> Default for Slots<K, V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<K, V> Slots<K, V> {
    fn clear(&mut self) {
        self.0.clear();
    }
}

impl<K: Clone, V: Clone> Slots<K, V> {
    /// The slot of `key`, loaded with `load` the first time.
    fn slot(&mut self, key: &K, load: impl FnOnce() -> Option<(Version, V)>) -> &mut Slot<K, V>
    where
        K: PartialEq,
    {
        let i = match self.0.iter().position(|s| s.key == *key) {
            Some(i) => i,
            None => {
                let (read, value) = match load() {
                    Some((v, r)) => (v, Some(r)),
                    None => (0, None),
                };
                self.0.push(Slot {
                    key: key.clone(),
                    read,
                    value,
                    dirty: false,
                });
                self.0.len() - 1
            }
        };
        &mut self.0[i]
    }
}

/// One input's view of the records: reads come from the store (and are
/// remembered with their versions), writes stay in the [`Transition`]
/// being built until the commit.
pub struct Txn<'a> {
    src: &'a dyn Records,
    t: Transition,
}

impl std::fmt::Debug for Txn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Txn")
            .field("t", &self.t)
            .finish_non_exhaustive()
    }
}

/// What a transaction read and wrote, owned, for [`Store::commit`].
#[derive(Clone, Debug, Default)]
pub struct Transition {
    users: Slots<UserId, UserRec>,
    devices: Slots<ConnId, DeviceRec>,
    calls: Slots<CallId, Call>,
    held: Slots<CallId, Vec<Notice>>,
    /// Rooms this transition claimed.
    rooms: Vec<u32>,
    /// The store's last version when the transaction began, if it said.
    began: Option<Version>,
}

impl Transition {
    /// The users read or written, for a store that commits them itself.
    pub(crate) fn users_slots(&self) -> &[Slot<UserId, UserRec>] {
        &self.users.0
    }
    pub(crate) fn devices_slots(&self) -> &[Slot<ConnId, DeviceRec>] {
        &self.devices.0
    }
    pub(crate) fn calls_slots(&self) -> &[Slot<CallId, Call>] {
        &self.calls.0
    }
    pub(crate) fn held_slots(&self) -> &[Slot<CallId, Vec<Notice>>] {
        &self.held.0
    }
    /// Rooms this transition claimed (the commit checks them free).
    pub(crate) fn claimed_rooms(&self) -> &[u32] {
        &self.rooms
    }

    /// Empty, its buffers kept.
    fn clear(&mut self) {
        self.users.clear();
        self.devices.clear();
        self.calls.clear();
        self.held.clear();
        self.rooms.clear();
        self.began = None;
    }
}

macro_rules! accessors {
    ($field:ident, $key:ty, $rec:ty, $get:ident, $get_mut:ident, $put:ident, $remove:ident, $load:expr) => {
        pub fn $get(&mut self, id: &$key) -> Option<&$rec> {
            let src = self.src;
            self.t.$field.slot(id, || $load(src, id)).value.as_ref()
        }
        pub fn $get_mut(&mut self, id: &$key) -> Option<&mut $rec> {
            let src = self.src;
            let slot = self.t.$field.slot(id, || $load(src, id));
            if slot.value.is_some() {
                slot.dirty = true;
            }
            slot.value.as_mut()
        }
        pub fn $put(&mut self, id: $key, rec: $rec) {
            let src = self.src;
            let slot = self.t.$field.slot(&id, || $load(src, &id));
            slot.value = Some(rec);
            slot.dirty = true;
        }
        pub fn $remove(&mut self, id: &$key) {
            let src = self.src;
            let slot = self.t.$field.slot(id, || $load(src, id));
            if slot.value.is_some() {
                slot.value = None;
                slot.dirty = true;
            }
        }
    };
}

impl<'a> Txn<'a> {
    pub fn new(src: &'a dyn Records) -> Self {
        Self::reusing(src, Transition::default())
    }

    /// A transaction that keeps its records in `buf`'s buffers (emptied).
    pub fn reusing(src: &'a dyn Records, mut buf: Transition) -> Self {
        buf.clear();
        buf.began = src.last_version();
        Self { src, t: buf }
    }

    accessors!(
        users,
        UserId,
        UserRec,
        user,
        user_mut,
        put_user,
        remove_user,
        |s: &dyn Records, k: &UserId| s.user(k).map(|(v, r)| (v, r.clone()))
    );
    accessors!(
        devices,
        ConnId,
        DeviceRec,
        device,
        device_mut,
        put_device,
        remove_device,
        |s: &dyn Records, k: &ConnId| s.device(*k).map(|(v, r)| (v, r.clone()))
    );
    accessors!(
        calls,
        CallId,
        Call,
        call,
        call_mut,
        put_call,
        remove_call,
        |s: &dyn Records, k: &CallId| s.call(*k).map(|(v, r)| (v, r.clone()))
    );
    accessors!(
        held,
        CallId,
        Vec<Notice>,
        held,
        held_mut,
        put_held,
        remove_held,
        |s: &dyn Records, k: &CallId| s.held(*k).map(|(v, r)| (v, r.clone()))
    );

    pub fn device_by_token(&self, token: &str) -> Option<ConnId> {
        self.src.device_by_token(token)
    }

    /// A room id no live call has (never 0, which means "no room"),
    /// claimed by this transition; the commit checks it is still free.
    pub fn allocate_room(&mut self) -> u32 {
        let mut room = self.src.room_hint();
        loop {
            room = room.wrapping_add(1);
            if room != 0 && !self.src.room_taken(room) && !self.t.rooms.contains(&room) {
                self.t.rooms.push(room);
                return room;
            }
        }
    }

    pub fn finish(self) -> Transition {
        self.t
    }
}

// ----- the in-memory store ------------------------------------------------

/// One table of the in-memory store.
#[derive(Debug)]
struct Table<K, V>(HashMap<K, (Version, V)>);

impl<K, V> Default for Table<K, V> {
    fn default() -> Self {
        Self(HashMap::default())
    }
}

impl<K: std::hash::Hash + Eq, V> Table<K, V> {
    fn version<Q>(&self, k: &Q) -> Version
    where
        K: Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.0.get(k).map_or(0, |(v, _)| *v)
    }

    fn unchanged(&self, slots: &Slots<K, V>) -> bool
    where
        K: Clone,
        V: Clone,
    {
        slots.0.iter().all(|s| self.version(&s.key) == s.read)
    }
}

/// All call state of one node, in memory: the default store. Owned by the
/// switchboard actor (the one writer), so its commits never conflict; the
/// version checks still run, which is what lets the tests interleave
/// transitions over it.
#[derive(Debug, Default)]
pub struct MemoryStore {
    /// The last version written.
    seq: Version,
    users: Table<UserId, UserRec>,
    devices: Table<ConnId, DeviceRec>,
    calls: Table<CallId, Call>,
    held: Table<CallId, Vec<Notice>>,
    timers: BTreeSet<(Time, Timer)>,
    rooms: HashSet<u32>,
    last_room: u32,
    tokens: HashMap<Arc<str>, ConnId>,
}

impl Records for MemoryStore {
    fn user(&self, id: &str) -> Option<(Version, &UserRec)> {
        self.users.0.get(id).map(|(v, r)| (*v, r))
    }
    fn device(&self, id: ConnId) -> Option<(Version, &DeviceRec)> {
        self.devices.0.get(&id).map(|(v, r)| (*v, r))
    }
    fn call(&self, id: CallId) -> Option<(Version, &Call)> {
        self.calls.0.get(&id).map(|(v, r)| (*v, r))
    }
    fn held(&self, id: CallId) -> Option<(Version, &Vec<Notice>)> {
        self.held.0.get(&id).map(|(v, r)| (*v, r))
    }
    fn device_by_token(&self, token: &str) -> Option<ConnId> {
        self.tokens.get(token).copied()
    }
    fn room_taken(&self, room: u32) -> bool {
        self.rooms.contains(&room)
    }
    fn room_hint(&self) -> u32 {
        self.last_room
    }
    fn last_version(&self) -> Option<Version> {
        Some(self.seq)
    }
}

/// A ringing call's deadline (what its ring timer is set to).
pub(crate) fn ring_deadline(call: &Call) -> Option<Time> {
    match &call.phase {
        Phase::Ringing { deadline, .. } => Some(*deadline),
        _ => None,
    }
}

/// A talking call's room (what it holds in the rooms index).
pub(crate) fn room(call: &Call) -> Option<u32> {
    match &call.phase {
        Phase::Talking { room, .. } => Some(*room),
        _ => None,
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn next_version(&mut self) -> Version {
        self.seq += 1;
        self.seq
    }

    fn write_call(&mut self, id: CallId, value: Option<Call>, v: Version) {
        let old = match value {
            Some(call) => {
                if let Some(t) = ring_deadline(&call) {
                    self.timers.insert((t, Timer::Ring(id)));
                }
                if let Some(r) = room(&call) {
                    self.rooms.insert(r);
                }
                self.calls.0.insert(id, (v, call))
            }
            None => self.calls.0.remove(&id),
        };
        if let Some((_, old)) = old {
            let new = self.calls.0.get(&id).map(|(_, c)| c);
            if let Some(t) = ring_deadline(&old)
                && new.and_then(ring_deadline) != Some(t)
            {
                self.timers.remove(&(t, Timer::Ring(id)));
            }
            if let Some(r) = room(&old)
                && new.and_then(room) != Some(r)
            {
                self.rooms.remove(&r);
            }
        }
    }

    fn write_device(&mut self, id: ConnId, value: Option<DeviceRec>, v: Version) {
        let old = match value {
            Some(d) => {
                if let Some(t) = d.until {
                    self.timers.insert((t, Timer::Grace(id)));
                }
                self.tokens.insert(d.resume_token.clone(), id);
                self.devices.0.insert(id, (v, d))
            }
            None => self.devices.0.remove(&id),
        };
        if let Some((_, old)) = old {
            let new = self.devices.0.get(&id).map(|(_, d)| d);
            if let Some(t) = old.until
                && new.and_then(|d| d.until) != Some(t)
            {
                self.timers.remove(&(t, Timer::Grace(id)));
            }
            if new.is_none_or(|d| d.resume_token != old.resume_token) {
                self.tokens.remove(&old.resume_token);
            }
        }
    }

    /// Parks `msg` for a detached device; whether it is now over the limit.
    fn park(&mut self, conn: ConnId, msg: Outgoing) -> Option<bool> {
        // A new version: a transaction that read the device must not
        // commit over the parked message.
        self.seq += 1;
        let seq = self.seq;
        let (v, d) = self.devices.0.get_mut(&conn)?;
        *v = seq;
        d.parked.push_back(msg);
        Some(d.parked.len() > PARK_LIMIT)
    }

    /// Timers due at `now`, earliest first.
    pub fn due(&self, now: Time) -> Vec<Timer> {
        self.timers
            .iter()
            .take_while(|(t, _)| *t <= now)
            .map(|(_, timer)| *timer)
            .collect()
    }

    /// The earliest timer, if any.
    pub fn next_timer(&self) -> Option<Time> {
        self.timers.first().map(|(t, _)| *t)
    }

    pub fn calls(&self) -> impl Iterator<Item = &Call> {
        self.calls.0.values().map(|(_, c)| c)
    }

    pub fn users(&self) -> impl Iterator<Item = (&UserId, &UserRec)> {
        self.users.0.iter().map(|(k, (_, u))| (k, u))
    }

    pub fn devices(&self) -> impl Iterator<Item = (ConnId, &DeviceRec)> {
        self.devices.0.iter().map(|(k, (_, d))| (*k, d))
    }

    pub fn device_count(&self) -> usize {
        self.devices.0.len()
    }

    /// Every record's version, by key, for tests that check versions never
    /// go back.
    pub fn versions(&self) -> Vec<(String, Version)> {
        let mut all: Vec<(String, Version)> = Vec::new();
        all.extend(
            self.users
                .0
                .iter()
                .map(|(k, (v, _))| (format!("u:{k}"), *v)),
        );
        all.extend(
            self.devices
                .0
                .iter()
                .map(|(k, (v, _))| (format!("d:{}", k.0), *v)),
        );
        all.extend(
            self.calls
                .0
                .iter()
                .map(|(k, (v, _))| (format!("c:{k}"), *v)),
        );
        all.extend(self.held.0.iter().map(|(k, (v, _))| (format!("h:{k}"), *v)));
        all
    }

    /// Whether the derived indexes agree with the records.
    pub fn check_indexes(&self) -> Result<(), String> {
        let mut timers = BTreeSet::new();
        let mut rooms = HashSet::default();
        for (id, (_, call)) in &self.calls.0 {
            if let Some(t) = ring_deadline(call) {
                timers.insert((t, Timer::Ring(*id)));
            }
            if let Some(r) = room(call)
                && !rooms.insert(r)
            {
                return Err(format!("room {r} is held by two live calls"));
            }
        }
        for (id, (_, d)) in &self.devices.0 {
            if let Some(t) = d.until {
                timers.insert((t, Timer::Grace(*id)));
            }
            if self.tokens.get(&d.resume_token) != Some(id) {
                return Err(format!("device {id:?}'s resume token is not indexed"));
            }
            if d.attached == d.until.is_some() {
                return Err(format!(
                    "device {id:?} is attached and expiring, or neither"
                ));
            }
            if d.attached && !d.parked.is_empty() {
                return Err(format!("attached device {id:?} has parked messages"));
            }
        }
        if timers != self.timers {
            return Err("the timers do not match the records".into());
        }
        if rooms != self.rooms {
            return Err("the rooms do not match the live calls".into());
        }
        if self.tokens.len() != self.devices.0.len() {
            return Err("a resume token is indexed for no device".into());
        }
        Ok(())
    }
}

impl Store for MemoryStore {
    fn commit(
        &mut self,
        t: &mut Transition,
        effects: &mut Vec<Effect>,
        from: usize,
    ) -> Result<Vec<ConnId>, Conflict> {
        // Nothing written since the transaction began (always, with one
        // owner): nothing to check.
        let fresh = t.began == Some(self.seq)
            || self.users.unchanged(&t.users)
                && self.devices.unchanged(&t.devices)
                && self.calls.unchanged(&t.calls)
                && self.held.unchanged(&t.held)
                && t.rooms.iter().all(|r| !self.rooms.contains(r));
        if !fresh {
            t.clear();
            return Err(Conflict);
        }
        let v = self.next_version();
        for s in t.users.0.drain(..).filter(|s| s.dirty) {
            match s.value {
                Some(u) => self.users.0.insert(s.key, (v, u)),
                None => self.users.0.remove(&s.key),
            };
        }
        for s in t.held.0.drain(..).filter(|s| s.dirty) {
            match s.value {
                Some(h) => self.held.0.insert(s.key, (v, h)),
                None => self.held.0.remove(&s.key),
            };
        }
        for s in t.calls.0.drain(..).filter(|s| s.dirty) {
            self.write_call(s.key, s.value, v);
        }
        for s in t.devices.0.drain(..).filter(|s| s.dirty) {
            self.write_device(s.key, s.value, v);
        }
        if let Some(&r) = t.rooms.last() {
            // Claims count up from the hint: the last is the newest.
            self.last_room = r;
        }
        t.rooms.clear();
        // Events for detached devices are parked (a clone: rare, and it
        // lets the others stay where they are).
        let mut overflowed = Vec::new();
        let mut i = 0;
        effects.retain(|e| {
            i += 1;
            let Effect::Send { conn, event } = e else {
                return true;
            };
            if i <= from {
                return true;
            }
            match self.devices.0.get(conn).map(|(_, d)| d.attached) {
                Some(true) => true,
                Some(false) => {
                    if self.park(*conn, Outgoing::Event(event.clone())) == Some(true) {
                        overflowed.push(*conn);
                    }
                    false
                }
                None => false,
            }
        });
        Ok(overflowed)
    }

    fn deliver(&mut self, conn: ConnId, msg: Outgoing) -> Delivery {
        match self.devices.0.get(&conn).map(|(_, d)| d.attached) {
            Some(true) => Delivery::Attached(msg),
            Some(false) => match self.park(conn, msg) {
                Some(true) => Delivery::Overflowed,
                _ => Delivery::Parked,
            },
            None => Delivery::Gone,
        }
    }
}
