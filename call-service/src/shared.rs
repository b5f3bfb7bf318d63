//! Call records in Redis: the store several call-service nodes share.
//!
//! The same rules ([`crate::machine`]) run on whichever node an input
//! arrives at, over records loaded from Redis; what a transition changed is
//! committed by one script that checks the version of every record read and
//! then writes, all at once. Nothing of the rules is written a second time
//! in Lua: the script knows keys, versions and indexes, not calls.
//!
//! **Reading.** The rules read synchronously through a [`Txn`], so an input
//! runs over a [`Snapshot`] of loaded records; a read of a record not
//! loaded yet is noted as a miss (and answered "absent"), the misses are
//! loaded in one round trip, and the input runs again. The run whose reads
//! all hit is the one committed. An input loads what it names before its
//! first run ([`Prefetch`]: a control's device and peer, a timer's call),
//! and a load follows what the records name ([`FETCH`]). A REQUEST's new
//! call and the room an answer picks are taken as absent and free without
//! a load: the commit checks both, so a wrong guess is a conflict and a
//! retry. A node keeps what it loaded and committed ([`RecordCache`]) and
//! runs inputs over that: an input over records only this node writes
//! takes one round trip (its commit); over records another node changed,
//! the commit is refused with their current values and the next attempt
//! commits over those (two round trips, no load). The usual input after
//! another node's commit is a reply to its event (an answer to a ring, a
//! hang-up after START), and that event carries the records its commit
//! read and wrote into the receiving node's cache
//! ([`InboxReader::feeding`]): one round trip then, too.
//!
//! **Routing** happens before the commit, in the transition itself: the
//! device of every event is read (so its version is checked too); events
//! for a detached device are parked in its record, events for a device
//! attached to another node go to that node's inbox stream in the same
//! script, and events for this node's devices come back to be delivered.
//!
//! **Layout** (every key under a prefix, `vc:` by default; one Redis
//! primary: a transition's keys span two users, see `docs/design.md`):
//! - `u:<user>`, `d:<device>`, `c:<call>`, `h:<call>`: one hash per record,
//!   `v` its version and `r` the record as JSON;
//! - `seq`: the version counter (a commit's records all get the next one);
//! - `timers`: sorted set of ring deadlines (`r:<call>`) and grace windows
//!   (`g:<device>`), scored by wall-clock milliseconds. A fire is an input
//!   like any other and the rules check the state it expects (a ring
//!   deadline passed, a device still detached past its window), so a timer
//!   fired twice, late, or by two nodes at once changes nothing the second
//!   time;
//! - `rooms`: the rooms of live calls (a claim is checked free in the
//!   commit); `tokens`: resume token → device;
//! - `inbox:<node>`: a stream per node of the events for its devices that
//!   other nodes committed ([`InboxReader`] waits on it), and of its
//!   streams that a resume elsewhere took over ([`Inbound::Moved`]);
//! - `leases`: when each node's lease ends; `reaping`: the nodes whose
//!   lapsed lease another node has begun to reap (they cannot renew it
//!   late); `devs:<node>`: the devices whose records name the node (what
//!   [`Node::reap`] walks).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use redis::aio::ConnectionManager;

use crate::device::Outgoing;
use crate::domain::{Call, CallId, ConnId, Control, Effect, Event, Notice, Outcome, Phase, Time};
use crate::domain::{ControlKind, ForceFinish, UserId, Verdict};
use crate::machine::{CONTENDED, Step};
use crate::store::{
    DeviceRec, MAX_ATTEMPTS, NodeId, PARK_LIMIT, Records, Timer, Transition, Txn, UserRec, Version,
    ring_deadline, room,
};
use crate::switchboard::CALLER_OVER_QUOTA;

/// The longest wait for one reply from Redis.
pub const STORE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// A Redis failure. The input it belonged to changed nothing, unless the
/// failure was the commit's own reply lost (a timeout after the script
/// ran): then the transition did happen, and its events and notices go on
/// through the inboxes; only its caller is told it failed. An approval it
/// asked for is not asked by this node then: the call's approval timer
/// (see [`SharedStore::time_approvals`]) decides it on some node.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected reply from redis: {0}")]
    Reply(#[from] redis::ParsingError),
    #[error("a record in redis could not be read ({key}): {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
    #[error("a record could not be encoded: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("redis did not answer in time")]
    Timeout,
}

/// The commit script. KEYS: `seq`, `timers`, `rooms`, `tokens`, `calls`,
/// `phases`, `pending`, the committing node's inbox, then the records (n), then the other keys it writes
/// (inboxes, notice lanes, nodes' device sets). ARGV: n, then per record its expected version, `k`
/// (only read), `w` (write, with its JSON) or `d` (delete), and the JSON (or
/// empty; of a record only read, its JSON when the commit sends an event to
/// another node: the first entry to each other node's inbox carries the
/// records written and read, see [`InboxReader::feeding`]); then counted lists: rooms claimed, rooms freed, timers cleared,
/// timers set (score, member), tokens dropped, tokens set (token, device),
/// inbox and lane entries (key index, device or empty for a notice, epoch
/// or for a notice its caller, counted in `pending`, JSON),
/// set members (key index, `a`dd or `r`emove, device), live calls listed
/// (`a` or `r`, call id), phase counts (phase, delta); last, a caller and
/// a quota (0: none): with that many of the caller's notices pending, the
/// commit is refused with `{2, 'quota', ''}` and changes nothing. Returns
/// `{1, version, mark}` or `{0, what conflicted, ''}` followed, when records
/// were stale, by key, version and record (empty when absent) of each, so
/// that the next attempt needs no load; `mark` is the
/// committing node's last inbox entry before this commit's own (`0-0`: none),
/// how far that node must have read for its devices to have every event
/// committed before this one. Versions come from `seq`; when it is missing
/// (Redis restarted empty) it starts again from the clock in microseconds,
/// so no version is ever given twice and a node's cached version of a
/// record (see [`RecordCache`]) never matches a newer record.
const COMMIT: &str = r#"
local base = 8
local qmax = tonumber(ARGV[#ARGV])
if qmax > 0 and tonumber(redis.call('HGET', KEYS[7], ARGV[#ARGV - 1]) or '0') >= qmax then
  return {2, 'quota', ''}
end
local n = tonumber(ARGV[1])
local a = 2
local stale = {0, 'stale', ''}
for i = 1, n do
  local k = KEYS[base + i]
  local have = redis.call('HGET', k, 'v') or '0'
  if have ~= ARGV[a] then
    stale[#stale + 1] = k
    local r = redis.call('HGET', k, 'r')
    if r then stale[#stale + 1] = have else stale[#stale + 1] = '' end
    stale[#stale + 1] = r or ''
  end
  a = a + 3
end
if #stale > 3 then return stale end
local claims = tonumber(ARGV[a]); a = a + 1
for i = 0, claims - 1 do
  if redis.call('SISMEMBER', KEYS[3], ARGV[a + i]) == 1 then return {0, 'room ' .. ARGV[a + i], ''} end
end
local last = redis.call('XREVRANGE', KEYS[8], '+', '-', 'COUNT', 1)
local mark = '0-0'
if last[1] then mark = last[1][1] end
if redis.call('EXISTS', KEYS[1]) == 0 then
  local t = redis.call('TIME')
  redis.call('SET', KEYS[1], t[1] * 1000000 + t[2])
end
local v = redis.call('INCR', KEYS[1])
local r = 2
for i = 1, n do
  local op = ARGV[r + 1]
  if op == 'w' then
    redis.call('HSET', KEYS[base + i], 'v', v, 'r', ARGV[r + 2])
  elseif op == 'd' then
    redis.call('DEL', KEYS[base + i])
  end
  r = r + 3
end
for i = 0, claims - 1 do redis.call('SADD', KEYS[3], ARGV[a + i]) end
a = a + claims
local freed = tonumber(ARGV[a]); a = a + 1
for i = 0, freed - 1 do redis.call('SREM', KEYS[3], ARGV[a + i]) end
a = a + freed
local cleared = tonumber(ARGV[a]); a = a + 1
for i = 0, cleared - 1 do redis.call('ZREM', KEYS[2], ARGV[a + i]) end
a = a + cleared
local set = tonumber(ARGV[a]); a = a + 1
for i = 0, set - 1 do redis.call('ZADD', KEYS[2], ARGV[a + 2 * i], ARGV[a + 2 * i + 1]) end
a = a + 2 * set
local dropped = tonumber(ARGV[a]); a = a + 1
for i = 0, dropped - 1 do redis.call('HDEL', KEYS[4], ARGV[a + i]) end
a = a + dropped
local tokens = tonumber(ARGV[a]); a = a + 1
for i = 0, tokens - 1 do redis.call('HSET', KEYS[4], ARGV[a + 2 * i], ARGV[a + 2 * i + 1]) end
a = a + 2 * tokens
local sent = tonumber(ARGV[a]); a = a + 1
local carry, carried = nil, {}
for i = 0, sent - 1 do
  local j = a + 4 * i
  local inbox = KEYS[base + n + tonumber(ARGV[j])]
  if ARGV[j + 1] == '' then
    redis.call('XADD', inbox, 'MAXLEN', '~', 100000, '*', 'n', ARGV[j + 3])
    redis.call('HINCRBY', KEYS[7], ARGV[j + 2], 1)
  elseif inbox ~= KEYS[8] and not carried[inbox] then
    carried[inbox] = true
    if not carry then
      carry = {'d', ARGV[j + 1], 'p', ARGV[j + 2], 'e', ARGV[j + 3]}
      local at = string.format('%.0f', v) .. ' '
      local w = 2
      for k = 1, n do
        local op = ARGV[w + 1]
        if op == 'w' or op == 'd' then
          carry[#carry + 1] = KEYS[base + k]
          carry[#carry + 1] = at .. ARGV[w + 2]
        elseif ARGV[w + 2] ~= '' then
          carry[#carry + 1] = KEYS[base + k]
          carry[#carry + 1] = ARGV[w] .. ' ' .. ARGV[w + 2]
        end
        w = w + 3
      end
    else
      carry[2], carry[4], carry[6] = ARGV[j + 1], ARGV[j + 2], ARGV[j + 3]
    end
    redis.call('XADD', inbox, 'MAXLEN', '~', 100000, '*', unpack(carry))
  else
    redis.call('XADD', inbox, 'MAXLEN', '~', 100000, '*', 'd', ARGV[j + 1], 'p', ARGV[j + 2], 'e', ARGV[j + 3])
  end
end
a = a + 4 * sent
local moves = tonumber(ARGV[a]); a = a + 1
for i = 0, moves - 1 do
  local j = a + 3 * i
  local set = KEYS[base + n + tonumber(ARGV[j])]
  if ARGV[j + 1] == 'a' then redis.call('SADD', set, ARGV[j + 2]) else redis.call('SREM', set, ARGV[j + 2]) end
end
a = a + 3 * moves
local listed = tonumber(ARGV[a]); a = a + 1
for i = 0, listed - 1 do
  local j = a + 2 * i
  if ARGV[j] == 'a' then redis.call('ZADD', KEYS[5], 0, ARGV[j + 1]) else redis.call('ZREM', KEYS[5], ARGV[j + 1]) end
end
a = a + 2 * listed
local phases = tonumber(ARGV[a]); a = a + 1
for i = 0, phases - 1 do redis.call('HINCRBY', KEYS[6], ARGV[a + 2 * i], ARGV[a + 2 * i + 1]) end
return {1, v, mark}
"#;

/// Loads records and, `depth` steps on, the records they name (ARGV:
/// prefix, depth, then keys without the prefix: `u:<user>`, `d:<device>`,
/// `c:<call>`, `h:<call>`): a user leads to its call and devices, a device
/// to its user, a call to both users, its devices and its held notices.
/// A rule's reads are nearly always among these, so an input takes one
/// load and its commit instead of a round trip per step. Returns key,
/// version, record (empty when absent) for each.
const FETCH: &str = r#"
local prefix = ARGV[1]
local depth = tonumber(ARGV[2])
local seen, out, frontier = {}, {}, {}
for i = 3, #ARGV do frontier[#frontier + 1] = ARGV[i] end
local function dev(n) return 'd:' .. string.format('%.0f', n) end
for level = 0, depth do
  local next = {}
  for _, k in ipairs(frontier) do
    if not seen[k] then
      seen[k] = true
      local vr = redis.call('HMGET', prefix .. k, 'v', 'r')
      out[#out + 1] = k
      out[#out + 1] = vr[1] or ''
      out[#out + 1] = vr[2] or ''
      if level < depth and vr[2] then
        local ok, rec = pcall(cjson.decode, vr[2])
        local kind = string.sub(k, 1, 1)
        if ok and type(rec) == 'table' then
          if kind == 'u' then
            if type(rec.call) == 'string' then next[#next + 1] = 'c:' .. rec.call end
            for _, d in ipairs(rec.devices or {}) do next[#next + 1] = dev(d) end
          elseif kind == 'd' and type(rec.user) == 'string' then
            next[#next + 1] = 'u:' .. rec.user
          elseif kind == 'c' then
            next[#next + 1] = 'u:' .. rec.caller
            next[#next + 1] = 'u:' .. rec.callee
            next[#next + 1] = dev(rec.caller_conn)
            next[#next + 1] = 'h:' .. string.sub(k, 3)
            local p = rec.phase
            if type(p) == 'table' and p.Ringing then
              for _, d in ipairs(p.Ringing.ringing or {}) do next[#next + 1] = dev(d) end
            elseif type(p) == 'table' and p.Talking then
              next[#next + 1] = dev(p.Talking.callee_conn)
            end
          end
        end
      end
    end
  end
  frontier = next
end
return out
"#;

/// How many steps [`FETCH`] follows from what a run missed.
const FETCH_DEPTH: u32 = 2;

/// Renews a node's lease (KEYS: `leases`, `reaping`; ARGV: node, now,
/// new end, `join` or `renew`). A lease is renewed, in time or late, as
/// long as no other node has begun to reap it ([`MARK`]): after an outage
/// of Redis longer than a lease, every node renews late and keeps its
/// streams, since no node reaps before its own lease has been renewed
/// cleanly for a whole lease. A lease being reaped is never renewed: the
/// node must close its streams and join afresh (`join`, once its lease is
/// gone, which also clears the mark). 1: held, 0: lost.
const RENEW: &str = r#"
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s and redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 0 then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  return 1
end
if not s and ARGV[4] == 'join' then
  redis.call('SREM', KEYS[2], ARGV[1])
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  return 1
end
return 0
"#;

/// Marks a node's lease as being reaped, if it ran out before `now`
/// (KEYS: `leases`, `reaping`; ARGV: node, now): from then on the node
/// cannot renew it late ([`RENEW`]). 1: marked (or was), 0: the lease is
/// live (renewed meanwhile) or gone.
const MARK: &str = r#"
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not s or tonumber(s) >= tonumber(ARGV[2]) then return 0 end
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"#;

/// Forgets a reaped node once none of its devices is left, unless it has
/// joined again meanwhile (KEYS: `leases`, `devs:<node>`, `reaping`; ARGV:
/// node, now).
const FORGET: &str = r#"
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s and tonumber(s) >= tonumber(ARGV[2]) then return 0 end
if redis.call('SCARD', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('SREM', KEYS[3], ARGV[1])
  return 1
end
return 0
"#;

/// What became of a node's lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lease {
    Held,
    /// It ran out: other nodes reap (or have reaped) this node's devices.
    Lost,
}

/// What an input is known to read before its rules say so, loaded ahead of
/// its first run: the rules find their reads one step at a time (a
/// device, then its user, then the peer the control names...), a round
/// trip per step, when the input itself names most of them. `absent`:
/// calls the input creates (their ids are new, UUID v7), taken as absent
/// without a load; the commit checks each is still absent, so a wrong
/// guess costs a retry, never a wrong result.
#[derive(Debug, Default)]
pub struct Prefetch {
    pub users: Vec<UserId>,
    pub devices: Vec<ConnId>,
    pub calls: Vec<CallId>,
    pub absent: Vec<CallId>,
    /// Not a load: the commit is refused, changing nothing, while this
    /// many notices of this caller's calls wait in the lanes (the
    /// per-caller quota, checked where the count is, in the same round
    /// trip as the commit).
    pub quota: Option<(UserId, usize)>,
}

impl Prefetch {
    pub fn user(user: &UserId) -> Self {
        Self {
            users: vec![user.clone()],
            ..Self::default()
        }
    }

    pub fn device(conn: ConnId) -> Self {
        Self {
            devices: vec![conn],
            ..Self::default()
        }
    }

    pub fn call(call: CallId) -> Self {
        Self {
            calls: vec![call],
            ..Self::default()
        }
    }

    fn is_empty(&self) -> bool {
        self.users.is_empty() && self.devices.is_empty() && self.calls.is_empty()
    }
}

/// Records loaded for one input, each with its version; a read of one not
/// loaded is a miss (see the module docs).
#[derive(Debug, Default)]
pub struct Snapshot {
    users: HashMap<UserId, Option<(Version, UserRec)>>,
    devices: HashMap<ConnId, Option<(Version, DeviceRec)>>,
    calls: HashMap<CallId, Option<(Version, Call)>>,
    held: HashMap<CallId, Option<(Version, Vec<Notice>)>>,
    tokens: HashMap<String, Option<ConnId>>,
    rooms: HashMap<u32, bool>,
    hint: u32,
    /// A room not loaded is taken as free: rooms are picked at random from
    /// 2^32 and the commit checks every claim, so the guess is nearly
    /// always right and a wrong one is a conflict, after which the retry
    /// loads the rooms it reads.
    rooms_free: bool,
    misses: RefCell<Misses>,
}

/// What a run read that the snapshot did not have.
#[derive(Debug, Default)]
struct Misses {
    users: Vec<UserId>,
    devices: Vec<ConnId>,
    calls: Vec<CallId>,
    held: Vec<CallId>,
    tokens: Vec<String>,
    rooms: Vec<u32>,
}

impl Misses {
    fn is_empty(&self) -> bool {
        self.users.is_empty()
            && self.devices.is_empty()
            && self.calls.is_empty()
            && self.held.is_empty()
            && self.tokens.is_empty()
            && self.rooms.is_empty()
    }
}

fn hit<'a, Q, K, V>(
    map: &'a HashMap<K, Option<(Version, V)>>,
    key: &Q,
    miss: impl FnOnce(),
) -> Option<(Version, &'a V)>
where
    Q: std::hash::Hash + Eq + ?Sized,
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
{
    match map.get(key) {
        Some(Some((v, r))) => Some((*v, r)),
        Some(None) => None,
        None => {
            miss();
            None
        }
    }
}

impl Records for Snapshot {
    fn user(&self, id: &str) -> Option<(Version, &UserRec)> {
        hit(&self.users, id, || {
            self.misses.borrow_mut().users.push(Arc::from(id));
        })
    }
    fn device(&self, id: ConnId) -> Option<(Version, &DeviceRec)> {
        hit(&self.devices, &id, || {
            self.misses.borrow_mut().devices.push(id)
        })
    }
    fn call(&self, id: CallId) -> Option<(Version, &Call)> {
        hit(&self.calls, &id, || self.misses.borrow_mut().calls.push(id))
    }
    fn held(&self, id: CallId) -> Option<(Version, &Vec<Notice>)> {
        hit(&self.held, &id, || self.misses.borrow_mut().held.push(id))
    }
    fn device_by_token(&self, token: &str) -> Option<ConnId> {
        match self.tokens.get(token) {
            Some(d) => *d,
            None => {
                self.misses.borrow_mut().tokens.push(token.to_owned());
                None
            }
        }
    }
    fn room_taken(&self, room: u32) -> bool {
        match self.rooms.get(&room) {
            Some(taken) => *taken,
            None if self.rooms_free => false,
            None => {
                self.misses.borrow_mut().rooms.push(room);
                false
            }
        }
    }
    fn room_hint(&self) -> u32 {
        self.hint
    }
}

/// Where a transition's effects go besides `out` (see
/// [`SharedStore::route`]).
#[derive(Default)]
struct Routed {
    /// Events for attached devices: their node, device, epoch.
    events: Vec<(NodeId, ConnId, u64, Event)>,
    /// Notices for the business service, in order.
    notices: Vec<Notice>,
    /// Detached devices that parked past their limit.
    overflowed: Vec<ConnId>,
}

/// The phase a call is counted under (`phases`).
fn phase_name(c: &Call) -> &'static str {
    match c.phase {
        Phase::Approving => "approving",
        Phase::Ringing { .. } => "ringing",
        Phase::Talking { .. } => "talking",
    }
}

/// How a commit went.
enum Committed {
    /// With the committing node's inbox mark (see [`COMMIT`]) and the
    /// version the commit gave its records.
    Yes(EntryId, Version),
    /// With the stale records' current values: key (without the prefix),
    /// version, record (both empty when absent).
    Conflict(Vec<(String, String, String)>),
    /// A room the transition claimed was taken.
    RoomTaken,
    /// The caller's notice quota was full (see [`Prefetch::quota`]).
    OverQuota,
}

/// A node's handle on the shared store.
#[derive(Clone)]
pub struct SharedStore {
    /// Set when this handle's last commit was refused for the caller's
    /// notice quota (see [`Prefetch::quota`]).
    over_quota: bool,
    conn: ConnectionManager,
    prefix: Arc<str>,
    node: NodeId,
    commit: Arc<redis::Script>,
    fetch: Arc<redis::Script>,
    /// Where this node starts looking for a free room: nodes start apart,
    /// so their claims rarely meet (a claim is checked in the commit).
    rooms: Arc<AtomicU32>,
    /// Commits that lost a race (and ran again).
    conflicts: Arc<AtomicU64>,
    /// Round trips to Redis (a pipeline or a script is one).
    trips: Arc<AtomicU64>,
    /// Where commits' and loads' round trips are timed, if anywhere.
    timing: Option<Timing>,
    /// The inbox mark of this handle's last commit (see [`COMMIT`]).
    mark: EntryId,
    /// The records this node last loaded or committed, shared by its
    /// handles (see [`RecordCache`]).
    cache: Arc<std::sync::Mutex<RecordCache>>,
    /// With a business service: how long after its REQUEST a call still
    /// waiting for approval (or holding its notices for it) is given the
    /// failure policy by any node (its own node died while asking).
    approval_timeout: Option<std::time::Duration>,
}

/// The histograms a node's commits and loads are timed into (its
/// metrics).
#[derive(Clone, Debug)]
pub struct Timing {
    pub commits: prometheus_client::metrics::histogram::Histogram,
    pub loads: prometheus_client::metrics::histogram::Histogram,
}

impl std::fmt::Debug for SharedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedStore")
            .field("prefix", &self.prefix)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

fn millis(t: Time) -> u64 {
    u64::try_from(t.as_millis()).unwrap_or(u64::MAX)
}

/// The script's arguments for one commit.
#[derive(Default)]
struct Args {
    keys: Vec<String>,
    records: Vec<(Version, &'static str, String)>,
    claims: Vec<u32>,
    freed: Vec<u32>,
    cleared: Vec<String>,
    set: Vec<(u64, String)>,
    dropped: Vec<String>,
    tokens: Vec<(String, u64)>,
    /// Keys after the records: inboxes and nodes' device sets.
    extra: Vec<String>,
    /// Inbox entries: key index, device (empty for a notice), epoch (for a
    /// notice its caller), JSON.
    sent: Vec<(usize, String, String, String)>,
    moves: Vec<(usize, &'static str, u64)>,
    /// Live calls added to (`a`) or removed from (`r`) the listing.
    listed: Vec<(&'static str, String)>,
    /// Calls per phase, changed by this commit.
    phases: Vec<(&'static str, i64)>,
    /// The caller whose notice quota the commit checks, and the quota.
    quota: Option<(UserId, usize)>,
}

impl Args {
    /// A timer that was due at `was` and is now due at `is` (either absent).
    fn timer(&mut self, member: String, was: Option<Time>, is: Option<Time>) {
        if was == is {
            return;
        }
        if was.is_some() {
            self.cleared.push(member.clone());
        }
        if let Some(t) = is {
            self.set.push((millis(t), member));
        }
    }

    /// The index (from 1) of an extra key, added if new.
    fn extra(&mut self, key: String) -> usize {
        match self.extra.iter().position(|k| *k == key) {
            Some(i) => i + 1,
            None => {
                self.extra.push(key);
                self.extra.len()
            }
        }
    }
}

impl SharedStore {
    /// A node's handle: `prefix` names the cluster's keys (`vc:`).
    pub async fn connect(url: &str, prefix: &str, node: NodeId) -> Result<Self, SharedError> {
        let client = redis::Client::open(url)?;
        // Every reply within the store's bound (a command that takes longer
        // fails, and its input is answered STORE_UNAVAILABLE); reconnects
        // are tried on the next command, so a Redis that comes back is used
        // again without a restart.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(STORE_TIMEOUT))
            .set_connection_timeout(Some(STORE_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(STORE_TIMEOUT);
        let conn = ConnectionManager::new_with_config(client, config).await?;
        Ok(Self {
            conn,
            prefix: Arc::from(prefix),
            node,
            commit: Arc::new(redis::Script::new(COMMIT)),
            fetch: Arc::new(redis::Script::new(FETCH)),
            rooms: Arc::new(AtomicU32::new(node.0.wrapping_mul(0x9E37_79B9))),
            conflicts: Arc::new(AtomicU64::new(0)),
            trips: Arc::new(AtomicU64::new(0)),
            timing: None,
            mark: EntryId::default(),
            cache: Arc::new(std::sync::Mutex::new(RecordCache::default())),
            over_quota: false,
            approval_timeout: None,
        })
    }

    /// A handle for a new node of the cluster: its id is the next of the
    /// cluster's counter (24 bits, never 0), so no two processes share one.
    pub async fn join(url: &str, prefix: &str) -> Result<Self, SharedError> {
        let mut store = Self::connect(url, prefix, NodeId(0)).await?;
        let n: u64 = redis::cmd("INCR")
            .arg(format!("{prefix}node-ids"))
            .query_async(&mut store.conn)
            .await?;
        let id = u32::try_from(n % ((1 << 24) - 1)).unwrap_or(0) + 1;
        store.node = NodeId(id);
        store.rooms = Arc::new(AtomicU32::new(id.wrapping_mul(0x9E37_79B9)));
        Ok(store)
    }

    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Times every commit and load of this handle and its clones.
    pub fn time_round_trips(&mut self, timing: Timing) {
        self.timing = Some(timing);
    }

    /// Notes how long a round trip that began at `start` took, in the
    /// histogram `which` picks (if round trips are timed).
    fn took(
        &self,
        which: fn(&Timing) -> &prometheus_client::metrics::histogram::Histogram,
        start: std::time::Instant,
    ) {
        if let Some(t) = &self.timing {
            which(t).observe(start.elapsed().as_secs_f64());
        }
    }

    /// Keeps an approval timer for every call waiting for approval (see
    /// [`Due::Approval`]), `timeout` after its REQUEST.
    pub fn time_approvals(&mut self, timeout: std::time::Duration) {
        self.approval_timeout = Some(timeout);
    }

    /// Leaves the cluster on shutdown: the lease is dropped at once (this
    /// node's devices were detached by the node itself), rather than
    /// waiting to run out.
    pub async fn leave(&mut self) -> Result<(), SharedError> {
        let _: u64 = redis::cmd("ZREM")
            .arg(format!("{}leases", self.prefix))
            .arg(self.node.0)
            .query_async(self.conn())
            .await?;
        Ok(())
    }

    /// Takes (`join`) or renews this node's lease until `now + ttl`
    /// (wall-clock, as every node's timers). See [`RENEW`].
    pub async fn lease(
        &mut self,
        now: Time,
        ttl: std::time::Duration,
        join: bool,
    ) -> Result<Lease, SharedError> {
        let held: u8 = redis::Script::new(RENEW)
            .key(format!("{}leases", self.prefix))
            .key(format!("{}reaping", self.prefix))
            .arg(self.node.0)
            .arg(millis(now))
            .arg(millis(now + ttl))
            .arg(if join { "join" } else { "renew" })
            .invoke_async(self.conn())
            .await?;
        Ok(if held == 1 { Lease::Held } else { Lease::Lost })
    }

    /// Nodes whose lease ran out before `now`.
    pub async fn expired_nodes(&mut self, now: Time) -> Result<Vec<NodeId>, SharedError> {
        let nodes: Vec<u32> = redis::cmd("ZRANGE")
            .arg(format!("{}leases", self.prefix))
            .arg("-inf")
            .arg(format!("({}", millis(now)))
            .arg("BYSCORE")
            .query_async(self.conn())
            .await?;
        Ok(nodes.into_iter().map(NodeId).collect())
    }

    /// Marks `node`'s lease as being reaped if it ran out before `now`
    /// (see [`MARK`]): whether it is, so that the reaping may go on.
    pub async fn mark_reaping(&mut self, node: NodeId, now: Time) -> Result<bool, SharedError> {
        let marked: u8 = redis::Script::new(MARK)
            .key(format!("{}leases", self.prefix))
            .key(format!("{}reaping", self.prefix))
            .arg(node.0)
            .arg(millis(now))
            .invoke_async(self.conn())
            .await?;
        Ok(marked == 1)
    }

    /// Whether `node`'s lease ran out before `now` (or is gone).
    pub async fn lease_expired(&mut self, node: NodeId, now: Time) -> Result<bool, SharedError> {
        let end: Option<u64> = redis::cmd("ZSCORE")
            .arg(format!("{}leases", self.prefix))
            .arg(node.0)
            .query_async(self.conn())
            .await?;
        Ok(end.is_none_or(|e| e < millis(now)))
    }

    /// The devices whose records name `node`.
    pub async fn node_devices(&mut self, node: NodeId) -> Result<Vec<ConnId>, SharedError> {
        let devs: Vec<u64> = redis::cmd("SMEMBERS")
            .arg(format!("{}devs:{}", self.prefix, node.0))
            .query_async(self.conn())
            .await?;
        Ok(devs.into_iter().map(ConnId).collect())
    }

    /// Forgets a reaped node if none of its devices is left; whether it did.
    pub async fn forget(&mut self, node: NodeId, now: Time) -> Result<bool, SharedError> {
        let done: u8 = redis::Script::new(FORGET)
            .key(format!("{}leases", self.prefix))
            .key(format!("{}devs:{}", self.prefix, node.0))
            .key(format!("{}reaping", self.prefix))
            .arg(node.0)
            .arg(millis(now))
            .invoke_async(self.conn())
            .await?;
        Ok(done == 1)
    }

    /// Commits of this handle (and its clones) that lost a race.
    pub fn conflicts(&self) -> u64 {
        self.conflicts.load(Ordering::Relaxed)
    }

    /// Round trips to Redis of this handle and its clones so far.
    pub fn round_trips(&self) -> u64 {
        self.trips.load(Ordering::Relaxed)
    }

    /// The connection, for one round trip (counted).
    fn conn(&mut self) -> &mut ConnectionManager {
        self.trips.fetch_add(1, Ordering::Relaxed);
        &mut self.conn
    }

    fn key(&self, kind: &str, id: impl std::fmt::Display) -> String {
        format!("{}{kind}:{id}", self.prefix)
    }

    /// Loads what a run missed, in one round trip: with the records they
    /// lead to (see [`FETCH`]), unless tokens or rooms were missed too.
    async fn load(&mut self, snap: &mut Snapshot, cached: bool) -> Result<(), SharedError> {
        let mut m = std::mem::take(&mut *snap.misses.borrow_mut());
        if cached {
            self.take_cached(snap, &mut m)?;
            if m.is_empty() {
                return Ok(());
            }
        }
        if m.tokens.is_empty() && m.rooms.is_empty() {
            return self.fetch(snap, m).await;
        }
        let mut pipe = redis::pipe();
        let mut keys = Vec::new();
        for u in &m.users {
            keys.push(self.key("u", u));
        }
        for d in &m.devices {
            keys.push(self.key("d", d.0));
        }
        for c in &m.calls {
            keys.push(self.key("c", c));
        }
        for h in &m.held {
            keys.push(self.key("h", h));
        }
        for k in &keys {
            pipe.cmd("HMGET").arg(k).arg("v").arg("r");
        }
        let tokens = format!("{}tokens", self.prefix);
        for t in &m.tokens {
            pipe.cmd("HGET").arg(&tokens).arg(t);
        }
        let rooms = format!("{}rooms", self.prefix);
        for r in &m.rooms {
            pipe.cmd("SISMEMBER").arg(&rooms).arg(r);
        }
        let start = std::time::Instant::now();
        let values = pipe.query_async::<Vec<redis::Value>>(self.conn()).await;
        self.took(|t| &t.loads, start);
        let values = values?;
        let mut values = values.into_iter();
        // The records, in the order of `keys`, as a load's: one decoder.
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        for k in &keys {
            let (v, r): (Option<String>, Option<String>) =
                redis::from_redis_value(values.next().unwrap_or(redis::Value::Nil))?;
            let key = k.strip_prefix(&*self.prefix).unwrap_or(k);
            let (v, r) = match (v, r) {
                (Some(v), Some(r)) => (v, r),
                _ => (String::new(), String::new()),
            };
            absorb(snap, key, &v, &r)?;
            cache.loaded(key, &v, &r);
        }
        drop(cache);
        for t in m.tokens {
            let d: Option<u64> =
                redis::from_redis_value(values.next().unwrap_or(redis::Value::Nil))?;
            snap.tokens.insert(t, d.map(ConnId));
        }
        for r in m.rooms {
            let taken: bool = redis::from_redis_value(values.next().unwrap_or(redis::Value::Nil))?;
            snap.rooms.insert(r, taken);
        }
        Ok(())
    }

    /// Loads the records a run missed and those they name, two steps on
    /// (see [`FETCH`]); each goes into the snapshot unless it is there.
    async fn fetch(&mut self, snap: &mut Snapshot, m: Misses) -> Result<(), SharedError> {
        let mut inv = self.fetch.prepare_invoke();
        inv.arg(&*self.prefix).arg(FETCH_DEPTH);
        for u in &m.users {
            inv.arg(format!("u:{u}"));
        }
        for d in &m.devices {
            inv.arg(format!("d:{}", d.0));
        }
        for c in &m.calls {
            inv.arg(format!("c:{c}"));
        }
        for h in &m.held {
            inv.arg(format!("h:{h}"));
        }
        self.trips.fetch_add(1, Ordering::Relaxed);
        let start = std::time::Instant::now();
        let flat = inv.invoke_async::<Vec<String>>(&mut self.conn).await;
        self.took(|t| &t.loads, start);
        let flat = flat?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        for t in flat.chunks_exact(3) {
            let (key, v, r) = (t[0].as_str(), t[1].as_str(), t[2].as_str());
            absorb(snap, key, v, r)?;
            cache.loaded(key, v, r);
        }
        Ok(())
    }

    /// Takes what `m` names from this node's cache into `snap`; leaves in
    /// `m` what the cache does not hold.
    fn take_cached(&self, snap: &mut Snapshot, m: &mut Misses) -> Result<(), SharedError> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.is_empty() {
            return Ok(());
        }
        let mut take = |key: String| -> Result<bool, SharedError> {
            match cache.get(&key) {
                Some((v, r)) => absorb(snap, &key, &v.to_string(), r).map(|()| true),
                None => Ok(false),
            }
        };
        let mut keep = Misses::default();
        for u in std::mem::take(&mut m.users) {
            if !take(format!("u:{u}"))? {
                keep.users.push(u);
            }
        }
        for d in std::mem::take(&mut m.devices) {
            if !take(format!("d:{}", d.0))? {
                keep.devices.push(d);
            }
        }
        for c in std::mem::take(&mut m.calls) {
            if !take(format!("c:{c}"))? {
                keep.calls.push(c);
            }
        }
        for h in std::mem::take(&mut m.held) {
            if !take(format!("h:{h}"))? {
                keep.held.push(h);
            }
        }
        m.users = keep.users;
        m.devices = keep.devices;
        m.calls = keep.calls;
        m.held = keep.held;
        Ok(())
    }

    /// Forgets every cached record (a connection dropped, Redis may have
    /// restarted: nothing cached is trusted again before it is loaded).
    pub fn forget_cached(&self) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Runs `rule` over records from Redis and commits what it did, again
    /// from fresh records on a conflict, at most [`MAX_ATTEMPTS`] times
    /// (`None`: no attempt committed, nothing changed). Like
    /// [`crate::store::transact`], `out` then holds the effects for this
    /// node's devices and for the business service; events for devices on
    /// other nodes went to their inboxes, events for detached devices were
    /// parked. The devices that parked past their limit come back.
    pub async fn transact<T>(
        &mut self,
        first: &Prefetch,
        out: &mut Vec<Effect>,
        mut rule: impl FnMut(&mut Txn<'_>, &mut Vec<Effect>) -> T,
    ) -> Result<Option<(T, Vec<ConnId>)>, SharedError> {
        let result = self.attempts(first, out, &mut rule).await;
        if result.is_err() {
            self.forget_cached();
        }
        result
    }

    async fn attempts<T>(
        &mut self,
        first: &Prefetch,
        out: &mut Vec<Effect>,
        rule: &mut impl FnMut(&mut Txn<'_>, &mut Vec<Effect>) -> T,
    ) -> Result<Option<(T, Vec<ConnId>)>, SharedError> {
        let from = out.len();
        let mut reconnected = false;
        let mut rooms_free = true;
        // A new call is taken as absent until a commit says otherwise (a
        // conflict on it) or may have placed it (a connection dropped with
        // the commit's reply on the way): then it is read like any record,
        // and the retry finds the call its own commit placed.
        let mut new_absent = true;
        // One attempt more than the rules' budget: the first may run over a
        // cached record another node has changed since.
        'attempt: for _ in 0..=MAX_ATTEMPTS {
            let mut snap = Snapshot {
                hint: self.rooms.fetch_add(1, Ordering::Relaxed),
                rooms_free,
                ..Snapshot::default()
            };
            for c in first.absent.iter().filter(|_| new_absent) {
                snap.calls.insert(*c, None);
                snap.held.insert(*c, None);
            }
            if !first.is_empty() {
                *snap.misses.borrow_mut() = Misses {
                    users: first.users.clone(),
                    devices: first.devices.clone(),
                    calls: first.calls.clone(),
                    ..Misses::default()
                };
                match self.load(&mut snap, true).await {
                    Ok(()) => {}
                    Err(e) if !reconnected && dropped(&e) => {
                        reconnected = true;
                        self.forget_cached();
                        continue 'attempt;
                    }
                    Err(e) => return Err(e),
                }
            }
            let (value, t, routed) = loop {
                // The transaction ends before any await: it borrows the
                // snapshot, which the load then fills.
                let run = {
                    out.truncate(from);
                    let mut txn = Txn::new(&snap);
                    let value = rule(&mut txn, out);
                    let routed = self.route(&mut txn, out, from);
                    let t = txn.finish();
                    snap.misses
                        .borrow()
                        .is_empty()
                        .then_some((value, t, routed))
                };
                match run {
                    Some(run) => break run,
                    None => match self.load(&mut snap, true).await {
                        Ok(()) => {}
                        Err(e) if !reconnected && dropped(&e) => {
                            reconnected = true;
                            self.forget_cached();
                            continue 'attempt;
                        }
                        Err(e) => return Err(e),
                    },
                }
            };
            let overflowed = routed.overflowed.clone();
            let mut args = self.args(&snap, &t, routed)?;
            args.quota.clone_from(&first.quota);
            // What the commit writes, and the records it finds absent, for
            // the cache once it has committed (a record read and left
            // alone keeps the entry it has).
            let written: Vec<(String, Option<String>)> = args
                .keys
                .iter()
                .zip(&args.records)
                .filter(|(_, (v, op, _))| *op != "k" || *v == 0)
                .map(|(k, (_, op, j))| {
                    let key = k.strip_prefix(&*self.prefix).unwrap_or(k).to_owned();
                    (key, (*op == "w").then(|| j.clone()))
                })
                .collect();
            let committed = match self.commit(args).await {
                Ok(c) => c,
                // Once, on a connection found dropped (a Redis restart, a
                // CLIENT KILL): the manager has reconnected. Had the script
                // run before the connection went, the run from fresh
                // records sees its own commit and does nothing twice.
                Err(e) if !reconnected && dropped(&e) => {
                    reconnected = true;
                    new_absent = false;
                    self.forget_cached();
                    out.truncate(from);
                    continue 'attempt;
                }
                Err(e) => return Err(e),
            };
            match committed {
                Committed::Yes(mark, v) => {
                    self.mark = mark;
                    let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                    // A new call's held notices: none, as of this commit
                    // (no other node knew the call before it).
                    for c in first.absent.iter().filter(|_| new_absent) {
                        cache.committed(format!("h:{c}"), v, None);
                    }
                    for (key, rec) in written {
                        cache.committed(key, v, rec);
                    }
                    return Ok(Some((value, overflowed)));
                }
                Committed::Conflict(stale) => {
                    self.conflicts.fetch_add(1, Ordering::Relaxed);
                    let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                    if stale
                        .iter()
                        .any(|(key, ..)| first.absent.iter().any(|c| *key == format!("c:{c}")))
                    {
                        new_absent = false;
                    }
                    for (key, v, r) in stale {
                        cache.loaded(&key, &v, &r);
                    }
                    out.truncate(from);
                }
                Committed::RoomTaken => {
                    self.conflicts.fetch_add(1, Ordering::Relaxed);
                    rooms_free = false;
                    out.truncate(from);
                }
                Committed::OverQuota => {
                    out.truncate(from);
                    self.over_quota = true;
                    return Ok(None);
                }
            }
        }
        Ok(None)
    }

    /// Reads through a transaction that is never committed (a query):
    /// `f` runs until every record it reads is loaded.
    pub async fn read<T>(
        &mut self,
        mut f: impl FnMut(&mut Txn<'_>) -> T,
    ) -> Result<T, SharedError> {
        let mut snap = Snapshot::default();
        let mut reconnected = false;
        loop {
            let value = {
                let mut txn = Txn::new(&snap);
                let value = f(&mut txn);
                snap.misses.borrow().is_empty().then_some(value)
            };
            match value {
                Some(v) => return Ok(v),
                None => match self.load(&mut snap, false).await {
                    Ok(()) => {}
                    Err(e) if !reconnected && dropped(&e) => reconnected = true,
                    Err(e) => return Err(e),
                },
            }
        }
    }

    /// Routes the effects in `out[from..]` through the transition: events
    /// for detached devices are parked in their records, events for
    /// attached devices (on any node, this one too) go to their node's
    /// inbox, and notices for the business service to this node's inbox, so
    /// that each node hands them on in commit order (see [`InboxReader`]).
    /// Approvals stay in `out`.
    fn route(&self, txn: &mut Txn<'_>, out: &mut Vec<Effect>, from: usize) -> Routed {
        let mut routed = Routed::default();
        let mut i = 0;
        out.retain(|e| {
            i += 1;
            if i <= from {
                return true;
            }
            let (conn, event) = match e {
                Effect::Send { conn, event } => (conn, event),
                Effect::Notify(n) => {
                    routed.notices.push(n.clone());
                    return false;
                }
                Effect::Approve(_) => return true,
            };
            match txn.device(conn).map(|d| (d.attached, d.node, d.epoch)) {
                Some((true, node, epoch)) => {
                    routed.events.push((node, *conn, epoch, event.clone()));
                }
                Some((false, _, _)) => {
                    if let Some(d) = txn.device_mut(conn) {
                        d.parked.push_back(Outgoing::Event(event.clone()));
                        if d.parked.len() == PARK_LIMIT + 1 {
                            routed.overflowed.push(*conn);
                        }
                    }
                }
                None => {}
            }
            false
        });
        routed
    }

    /// The commit script's arguments for a transition run over `snap`: the
    /// versions to check, the writes, and the indexes its records imply.
    fn args(&self, snap: &Snapshot, t: &Transition, routed: Routed) -> Result<Args, SharedError> {
        let mut a = Args::default();
        // Records read go along too when an event goes to another node:
        // its next input is likely to read them (see `InboxReader::feeding`).
        let carry = routed.events.iter().any(|(node, ..)| *node != self.node);
        for s in t.users_slots() {
            a.keys.push(self.key("u", &s.key));
            a.records.push(op(s, carry)?);
        }
        // A call's approval timer: while it is approving, or its notices
        // are held for the approval (it ended meanwhile).
        let mut approvals: HashMap<CallId, (Option<Time>, Option<Time>)> = HashMap::new();
        let approval = self.approval_timeout;
        for s in t.held_slots() {
            a.keys.push(self.key("h", s.key));
            a.records.push(op(s, carry)?);
            if let (Some(after), true) = (approval, s.dirty) {
                let at = |h: &Vec<Notice>| h.first().map(|n| n.requested_at + after);
                let old = snap
                    .held
                    .get(&s.key)
                    .and_then(|h| h.as_ref())
                    .map(|(_, h)| h);
                let e = approvals.entry(s.key).or_default();
                e.0 = e.0.or(old.and_then(at));
                e.1 = e.1.or(s.value.as_ref().and_then(at));
            }
        }
        for s in t.calls_slots() {
            a.keys.push(self.key("c", s.key));
            a.records.push(op(s, carry)?);
            if !s.dirty {
                continue;
            }
            let old = snap
                .calls
                .get(&s.key)
                .and_then(|c| c.as_ref())
                .map(|(_, c)| c);
            let new = s.value.as_ref();
            a.timer(
                format!("r:{}", s.key),
                old.and_then(ring_deadline),
                new.and_then(ring_deadline),
            );
            if let Some(after) = approval {
                let at = |c: &Call| (c.phase == Phase::Approving).then(|| c.requested_at + after);
                let e = approvals.entry(s.key).or_default();
                e.0 = e.0.or(old.and_then(at));
                e.1 = e.1.or(new.and_then(at));
            }
            match (old.is_some(), new.is_some()) {
                (false, true) => a.listed.push(("a", s.key.to_string())),
                (true, false) => a.listed.push(("r", s.key.to_string())),
                _ => {}
            }
            let (was, is) = (old.map(phase_name), new.map(phase_name));
            if was != is {
                a.phases.extend(was.map(|p| (p, -1)));
                a.phases.extend(is.map(|p| (p, 1)));
            }
            if let Some(r) = old.and_then(room)
                && new.and_then(room) != Some(r)
            {
                a.freed.push(r);
            }
        }
        for s in t.devices_slots() {
            a.keys.push(self.key("d", s.key.0));
            a.records.push(op(s, carry)?);
            if !s.dirty {
                continue;
            }
            let old = snap
                .devices
                .get(&s.key)
                .and_then(|d| d.as_ref())
                .map(|(_, d)| d);
            let new = s.value.as_ref();
            a.timer(
                format!("g:{}", s.key.0),
                old.and_then(|d| d.until),
                new.and_then(|d| d.until),
            );
            // Which node's devices it is among (what a reaper walks).
            let (was, is) = (old.map(|d| d.node), new.map(|d| d.node));
            if was != is {
                if let Some(n) = was {
                    let i = a.extra(format!("{}devs:{}", self.prefix, n.0));
                    a.moves.push((i, "r", s.key.0));
                }
                if let Some(n) = is {
                    let i = a.extra(format!("{}devs:{}", self.prefix, n.0));
                    a.moves.push((i, "a", s.key.0));
                }
            }
            let (was, is) = (old.map(|d| &d.resume_token), new.map(|d| &d.resume_token));
            if was != is {
                if let Some(tok) = was {
                    a.dropped.push(tok.to_string());
                }
                if let Some(tok) = is {
                    a.tokens.push((tok.to_string(), s.key.0));
                }
            }
        }
        for (id, (was, is)) in approvals {
            a.timer(format!("a:{id}"), was, is);
        }
        a.claims.extend(t.claimed_rooms());
        for (node, conn, epoch, event) in routed.events {
            let i = a.extra(format!("{}inbox:{}", self.prefix, node.0));
            a.sent
                .push((i, conn.0.to_string(), epoch.to_string(), json(&event)?));
        }
        for n in routed.notices {
            let i = a.extra(format!("{}nl:{}", self.prefix, lane_of(n.call_id)));
            a.sent
                .push((i, String::new(), n.caller.to_string(), json(&n)?));
        }
        Ok(a)
    }

    /// Runs the commit script (see [`SharedStore::args`]).
    async fn commit(&mut self, a: Args) -> Result<Committed, SharedError> {
        let commit = self.commit.clone();
        let mut inv = commit.prepare_invoke();
        inv.key(format!("{}seq", self.prefix))
            .key(format!("{}timers", self.prefix))
            .key(format!("{}rooms", self.prefix))
            .key(format!("{}tokens", self.prefix))
            .key(format!("{}calls", self.prefix))
            .key(format!("{}phases", self.prefix))
            .key(format!("{}pending", self.prefix))
            .key(format!("{}inbox:{}", self.prefix, self.node.0));
        for k in &a.keys {
            inv.key(k);
        }
        for k in &a.extra {
            inv.key(k);
        }
        inv.arg(a.records.len());
        for (v, o, j) in &a.records {
            inv.arg(*v).arg(*o).arg(j);
        }
        inv.arg(a.claims.len()).arg(&a.claims);
        inv.arg(a.freed.len()).arg(&a.freed);
        inv.arg(a.cleared.len()).arg(&a.cleared);
        inv.arg(a.set.len());
        for (score, m) in &a.set {
            inv.arg(*score).arg(m);
        }
        inv.arg(a.dropped.len()).arg(&a.dropped);
        inv.arg(a.tokens.len());
        for (tok, d) in &a.tokens {
            inv.arg(tok).arg(*d);
        }
        inv.arg(a.sent.len());
        for (i, d, epoch, e) in &a.sent {
            inv.arg(*i).arg(d).arg(epoch).arg(e);
        }
        inv.arg(a.moves.len());
        for (i, op, d) in &a.moves {
            inv.arg(*i).arg(*op).arg(*d);
        }
        inv.arg(a.listed.len());
        for (op, id) in &a.listed {
            inv.arg(*op).arg(id);
        }
        inv.arg(a.phases.len());
        for (p, d) in &a.phases {
            inv.arg(*p).arg(*d);
        }
        match &a.quota {
            Some((caller, max)) => inv.arg(caller.as_ref()).arg(*max),
            None => inv.arg("").arg(0),
        };
        let start = std::time::Instant::now();
        let reply = inv.invoke_async::<Vec<redis::Value>>(self.conn()).await;
        self.took(|t| &t.commits, start);
        let reply = reply?;
        let mut reply = reply.into_iter();
        let ok: u8 = redis::from_redis_value(reply.next().unwrap_or(redis::Value::Nil))?;
        let what = reply.next().unwrap_or(redis::Value::Nil);
        if ok == 0 && matches!(&what, redis::Value::BulkString(w) if w.starts_with(b"room")) {
            return Ok(Committed::RoomTaken);
        }
        let mark: String = redis::from_redis_value(reply.next().unwrap_or(redis::Value::Nil))?;
        Ok(match ok {
            1 => Committed::Yes(
                EntryId::parse(&mark).unwrap_or_default(),
                redis::from_redis_value(what)?,
            ),
            2 => Committed::OverQuota,
            _ => {
                let rest: Vec<String> = reply
                    .map(redis::from_redis_value)
                    .collect::<Result<_, _>>()?;
                let stale = rest
                    .chunks_exact(3)
                    .map(|t| {
                        let key = t[0].strip_prefix(&*self.prefix).unwrap_or(&t[0]);
                        (key.to_owned(), t[1].clone(), t[2].clone())
                    })
                    .collect();
                Committed::Conflict(stale)
            }
        })
    }

    /// Tells `node` that its stream of `conn` at `epoch` was taken over by
    /// a resume elsewhere ([`Inbound::Moved`]).
    pub async fn moved(
        &mut self,
        node: NodeId,
        conn: ConnId,
        epoch: u64,
    ) -> Result<(), SharedError> {
        let _: String = redis::cmd("XADD")
            .arg(self.key("inbox", node.0))
            .arg("MAXLEN")
            .arg("~")
            .arg(100_000)
            .arg("*")
            .arg("m")
            .arg(conn.0)
            .arg("p")
            .arg(epoch)
            .query_async(self.conn())
            .await?;
        Ok(())
    }

    /// Timers due at `now` (at most `limit`), earliest first.
    pub async fn due(&mut self, now: Time, limit: usize) -> Result<Vec<Due>, SharedError> {
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg(format!("{}timers", self.prefix))
            .arg("-inf")
            .arg(millis(now))
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(self.conn())
            .await?;
        Ok(members.iter().filter_map(|m| parse_timer(m)).collect())
    }

    /// How far this node's inbox must have been handed on before a result
    /// of this handle's last commit may follow: its last entry before the
    /// commit (see [`COMMIT`]).
    pub fn mark(&self) -> EntryId {
        self.mark
    }

    /// Whether the last commit was refused for a caller's notice quota
    /// (and clears it).
    fn take_over_quota(&mut self) -> bool {
        std::mem::take(&mut self.over_quota)
    }

    /// The entries of `node`'s inbox after `after` (`0-0` at first), at
    /// most `count`, each with its entry id to read on from.
    pub async fn inbox(
        &mut self,
        node: NodeId,
        after: &str,
        count: usize,
    ) -> Result<Vec<(String, Inbound)>, SharedError> {
        let key = format!("{}inbox:{}", self.prefix, node.0);
        let reply: redis::Value = redis::cmd("XRANGE")
            .arg(&key)
            .arg(format!("({after}"))
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(self.conn())
            .await?;
        let entries: Vec<(String, HashMap<String, String>)> = redis::from_redis_value(reply)?;
        let mut out = Vec::new();
        for (id, fields) in entries {
            if let Some(e) = inbound(&key, &id, &fields)? {
                out.push((id, e));
            }
        }
        Ok(out)
    }

    /// Drops the entries of `node`'s inbox that went in more than `keep`
    /// before the entry `last` (by Redis's clock, the entry ids' time):
    /// what a node read recently stays, so if it dies with those events
    /// still on their way to its clients, the reaper parks them again for
    /// the devices' resume (a client may then see an event twice: see
    /// `CallEvent` in `call.proto`).
    pub async fn trim_inbox_read(
        &mut self,
        node: NodeId,
        last: &str,
        keep: std::time::Duration,
    ) -> Result<(), SharedError> {
        let Some(ms) = last
            .split_once('-')
            .and_then(|(ms, _)| ms.parse::<u64>().ok())
        else {
            return Ok(());
        };
        let keep = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX);
        let Some(before) = ms.checked_sub(keep) else {
            return Ok(());
        };
        self.trim_inbox_below(node, &format!("{before}-0")).await
    }

    /// Drops the entries of `node`'s inbox up to `upto` (handed on).
    pub async fn trim_inbox(&mut self, node: NodeId, upto: &str) -> Result<(), SharedError> {
        match next_entry(upto) {
            Some(next) => self.trim_inbox_below(node, &next).await,
            None => Ok(()),
        }
    }

    /// Drops the entries of `node`'s inbox below the entry id `min`.
    async fn trim_inbox_below(&mut self, node: NodeId, min: &str) -> Result<(), SharedError> {
        let _: u64 = redis::cmd("XTRIM")
            .arg(format!("{}inbox:{}", self.prefix, node.0))
            .arg("MINID")
            .arg(min)
            .query_async(self.conn())
            .await?;
        Ok(())
    }

    /// Live calls by phase, over the cluster: (approving, ringing, talking).
    pub async fn phase_counts(&mut self) -> Result<(usize, usize, usize), SharedError> {
        let counts: HashMap<String, i64> = redis::cmd("HGETALL")
            .arg(format!("{}phases", self.prefix))
            .query_async(self.conn())
            .await?;
        let get = |p: &str| usize::try_from(counts.get(p).copied().unwrap_or(0)).unwrap_or(0);
        Ok((get("approving"), get("ringing"), get("talking")))
    }

    /// Up to `limit` ids of live calls above `after`, in id order.
    pub async fn call_ids(
        &mut self,
        after: Option<CallId>,
        limit: usize,
    ) -> Result<Vec<CallId>, SharedError> {
        let from = after.map_or_else(|| "-".to_owned(), |a| format!("({a}"));
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(format!("{}calls", self.prefix))
            .arg(from)
            .arg("+")
            .arg("BYLEX")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(self.conn())
            .await?;
        Ok(ids
            .iter()
            .filter_map(|i| i.parse().ok())
            .map(CallId)
            .collect())
    }
}

/// Notice lanes: a call's notices go to lane `call id % NOTICE_LANES`,
/// a stream each (`nl:<lane>`), so that one reader, whichever node
/// committed them, hands them to the business service in commit order.
pub const NOTICE_LANES: u32 = 8;

/// The lane of a call's notices.
pub fn lane_of(call: CallId) -> u32 {
    (call.0.as_u128() % u128::from(NOTICE_LANES)) as u32
}

/// Claims the notice lanes that have no live owner (KEYS: `leases`,
/// `lane-owners`; ARGV: node, now, lanes). Returns the lanes the node owns.
const CLAIM: &str = r#"
local owned = {}
for lane = 0, tonumber(ARGV[3]) - 1 do
  local owner = redis.call('HGET', KEYS[2], lane)
  local live = false
  if owner then
    local s = redis.call('ZSCORE', KEYS[1], owner)
    live = s and tonumber(s) >= tonumber(ARGV[2])
  end
  if owner == ARGV[1] or not live then
    redis.call('HSET', KEYS[2], lane, ARGV[1])
    owned[#owned + 1] = lane
  end
end
return owned
"#;

/// Gives up a node's lanes (KEYS: `lane-owners`; ARGV: node, lanes).
const RELEASE: &str = r#"
for lane = 0, tonumber(ARGV[2]) - 1 do
  if redis.call('HGET', KEYS[1], lane) == ARGV[1] then redis.call('HDEL', KEYS[1], lane) end
end
return 0
"#;

impl SharedStore {
    /// Claims the notice lanes no live node owns (its own included, if its
    /// lease is held), and returns those it owns, each with where its
    /// delivery stands (the last entry handed on, `0-0` at first).
    pub async fn claim_lanes(&mut self, now: Time) -> Result<Vec<(u32, String)>, SharedError> {
        let lanes: Vec<u32> = redis::Script::new(CLAIM)
            .key(format!("{}leases", self.prefix))
            .key(format!("{}lane-owners", self.prefix))
            .arg(self.node.0)
            .arg(millis(now))
            .arg(NOTICE_LANES)
            .invoke_async(self.conn())
            .await?;
        if lanes.is_empty() {
            return Ok(Vec::new());
        }
        let pos: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(format!("{}lane-pos", self.prefix))
            .arg(&lanes)
            .query_async(self.conn())
            .await?;
        Ok(lanes
            .into_iter()
            .zip(pos)
            .map(|(l, p)| (l, p.unwrap_or_else(|| "0-0".to_owned())))
            .collect())
    }

    /// Gives up this node's lanes (it stops): the others claim them at once.
    pub async fn release_lanes(&mut self) -> Result<(), SharedError> {
        let _: u8 = redis::Script::new(RELEASE)
            .key(format!("{}lane-owners", self.prefix))
            .arg(self.node.0)
            .arg(NOTICE_LANES)
            .invoke_async(self.conn())
            .await?;
        Ok(())
    }

    /// Notes, for each lane, that its notices up to `upto` were handed on
    /// (`callers`: how many of each caller's), and drops them from the
    /// lane, in one round trip; the next owner goes on from there.
    pub async fn lanes_done(&mut self, done: &[LaneDone]) -> Result<(), SharedError> {
        let mut pipe = redis::pipe();
        let mut any = false;
        for d in done {
            let Some(next) = next_entry(&d.upto) else {
                continue;
            };
            any = true;
            for (caller, n) in &d.callers {
                pipe.cmd("HINCRBY")
                    .arg(format!("{}pending", self.prefix))
                    .arg(caller.as_ref())
                    .arg(-n)
                    .ignore();
            }
            pipe.cmd("HSET")
                .arg(format!("{}lane-pos", self.prefix))
                .arg(d.lane)
                .arg(&d.upto)
                .ignore()
                .cmd("XTRIM")
                .arg(format!("{}nl:{}", self.prefix, d.lane))
                .arg("MINID")
                .arg(next)
                .ignore();
        }
        if !any {
            return Ok(());
        }
        let _: () = pipe.query_async(self.conn()).await?;
        Ok(())
    }

    /// How many notices of `caller`'s calls wait in the lanes, over the
    /// cluster (the per-caller quota).
    pub async fn pending(&mut self, caller: &str) -> Result<usize, SharedError> {
        let n: Option<i64> = redis::cmd("HGET")
            .arg(format!("{}pending", self.prefix))
            .arg(caller)
            .query_async(self.conn())
            .await?;
        Ok(usize::try_from(n.unwrap_or(0)).unwrap_or(0))
    }

    /// A lane's notices after `after`, at most `count`, with their ids.
    pub async fn lane(
        &mut self,
        lane: u32,
        after: &str,
        count: usize,
    ) -> Result<Vec<(String, Notice)>, SharedError> {
        let key = format!("{}nl:{lane}", self.prefix);
        let reply: redis::Value = redis::cmd("XRANGE")
            .arg(&key)
            .arg(format!("({after}"))
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(self.conn())
            .await?;
        let entries: Vec<(String, HashMap<String, String>)> = redis::from_redis_value(reply)?;
        let mut out = Vec::new();
        for (id, fields) in entries {
            if let Some(Inbound::Notice(n)) = inbound(&key, &id, &fields)? {
                out.push((id, n));
            }
        }
        Ok(out)
    }
}

/// How far a lane's notices were handed on, and how many of each
/// caller's (see [`SharedStore::lanes_done`]).
#[derive(Debug, Default)]
pub struct LaneDone {
    pub lane: u32,
    pub upto: String,
    pub callers: HashMap<UserId, i64>,
}

/// A node's reader of the notice lanes it owns (a connection of its own,
/// for blocking reads, as [`InboxReader`]).
#[derive(Clone)]
pub struct LaneReader {
    conn: redis::aio::MultiplexedConnection,
    prefix: String,
}

impl std::fmt::Debug for LaneReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaneReader")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl LaneReader {
    pub async fn open(url: &str, prefix: &str) -> Result<Self, SharedError> {
        let client = redis::Client::open(url)?;
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        Ok(Self {
            conn,
            prefix: prefix.to_owned(),
        })
    }

    /// Waits up to `block` for notices in `lanes` (each after its entry)
    /// and returns at most `count` of each lane, with lane and entry id.
    pub async fn next(
        &mut self,
        lanes: &[(u32, String)],
        block: std::time::Duration,
        count: usize,
    ) -> Result<Vec<(u32, String, Notice)>, SharedError> {
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(u64::try_from(block.as_millis()).unwrap_or(u64::MAX).max(1))
            .arg("STREAMS");
        for (lane, _) in lanes {
            cmd.arg(format!("{}nl:{lane}", self.prefix));
        }
        for (_, after) in lanes {
            cmd.arg(after);
        }
        let reply: XRead = cmd.query_async(&mut self.conn).await?;
        let mut out = Vec::new();
        for (key, entries) in reply.unwrap_or_default() {
            let Some(lane) = key.rsplit(':').next().and_then(|l| l.parse().ok()) else {
                continue;
            };
            for (id, fields) in entries {
                if let Some(Inbound::Notice(n)) = inbound(&key, &id, &fields)? {
                    out.push((lane, id, n));
                }
            }
        }
        Ok(out)
    }
}

/// What a node's inbox carries.
#[derive(Clone, Debug)]
pub enum Inbound {
    /// An event for a device of the node, sent to the attachment `epoch`.
    Event {
        conn: ConnId,
        epoch: u64,
        event: Event,
    },
    /// A notice for the business service (in a notice lane).
    Notice(Notice),
    /// The device was resumed on another node while its stream at `epoch`
    /// was still open here: that stream is deaf from now on (its events go
    /// to the new node, its controls are refused by epoch) and is ended.
    Moved { conn: ConnId, epoch: u64 },
}

/// An inbox entry's fields read back (`None`: not one of ours).
fn inbound(
    key: &str,
    id: &str,
    fields: &HashMap<String, String>,
) -> Result<Option<Inbound>, SharedError> {
    let corrupt = |source| SharedError::Corrupt {
        key: format!("{key} entry {id}"),
        source,
    };
    if let Some(n) = fields.get("n") {
        return Ok(Some(Inbound::Notice(
            serde_json::from_str(n).map_err(corrupt)?,
        )));
    }
    if let Some(conn) = fields.get("m").and_then(|m| m.parse().ok()) {
        let epoch = fields.get("p").and_then(|p| p.parse().ok()).unwrap_or(0);
        return Ok(Some(Inbound::Moved {
            conn: ConnId(conn),
            epoch,
        }));
    }
    let (Some(d), Some(e)) = (
        fields.get("d").and_then(|d| d.parse().ok()),
        fields.get("e"),
    ) else {
        return Ok(None);
    };
    let epoch = fields.get("p").and_then(|p| p.parse().ok()).unwrap_or(0);
    Ok(Some(Inbound::Event {
        conn: ConnId(d),
        epoch,
        event: serde_json::from_str(e).map_err(corrupt)?,
    }))
}

/// A stream entry id (`<ms>-<seq>`), in the order Redis gives them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct EntryId(u64, u64);

impl EntryId {
    pub fn parse(id: &str) -> Option<Self> {
        let (ms, seq) = id.split_once('-')?;
        Some(Self(ms.parse().ok()?, seq.parse().ok()?))
    }
}

/// The most entries of an old node's inbox a resume looks through for
/// the events its device may have missed.
const RESEND_SCAN: usize = 20_000;

/// The least stream entry id after `id` (`ms-seq`).
fn next_entry(id: &str) -> Option<String> {
    let (ms, seq) = id.split_once('-')?;
    let (ms, seq): (u64, u64) = (ms.parse().ok()?, seq.parse().ok()?);
    Some(match seq.checked_add(1) {
        Some(seq) => format!("{ms}-{seq}"),
        None => format!("{}-0", ms.checked_add(1)?),
    })
}

/// A node's reader of its own inbox: the events other nodes committed for
/// its devices, in commit order, from the last entry it read. It has a
/// connection of its own with no response timeout, since a blocking `XREAD`
/// would hold the shared connection (whose replies time out after 500 ms).
#[derive(Clone)]
pub struct InboxReader {
    conn: redis::aio::MultiplexedConnection,
    key: String,
    prefix: String,
    /// The node's [`RecordCache`], kept fresh with the records an entry
    /// carries (see [`InboxReader::feeding`]).
    cache: Option<Arc<std::sync::Mutex<RecordCache>>>,
    /// The last entry read: a reader that reconnects goes on from it, so
    /// nothing is lost.
    last: String,
    /// The time of the oldest entry of the last batch (see
    /// [`InboxReader::oldest_ms`]).
    oldest_ms: Option<u64>,
}

impl std::fmt::Debug for InboxReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboxReader")
            .field("key", &self.key)
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

/// `XREAD`'s reply: per stream, its entries, each an id and its fields.
type XRead = Option<Vec<(String, Vec<(String, HashMap<String, String>)>)>>;

impl InboxReader {
    /// `node`'s inbox, read from `after` on (`0-0`: from the start, `$`:
    /// only what comes next).
    pub async fn open(
        url: &str,
        prefix: &str,
        node: NodeId,
        after: &str,
    ) -> Result<Self, SharedError> {
        let client = redis::Client::open(url)?;
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        Ok(Self {
            conn,
            key: format!("{prefix}inbox:{}", node.0),
            prefix: prefix.to_owned(),
            cache: None,
            last: after.to_owned(),
            oldest_ms: None,
        })
    }

    /// Puts the records its entries carry into `store`'s cache. The first
    /// event a commit sends to another node's inbox carries what the
    /// commit read and wrote, so that node's next input over them (the callee's
    /// answer after its REQUEST, the caller's hang-up after START) runs
    /// over current records and commits at once, instead of being refused
    /// as stale first. The cache is taken before the events are handed on,
    /// so a client's reply to an event always finds it. Versions order
    /// what the cache keeps (a newer record is never replaced by an older
    /// one) and every commit checks them, so a carried record is only
    /// ever a round trip saved, never a wrong read.
    pub fn feeding(mut self, store: &SharedStore) -> Self {
        self.cache = Some(store.cache.clone());
        self
    }

    /// The entry it read last.
    pub fn last(&self) -> &str {
        &self.last
    }

    /// Waits up to `block` for entries after the last one read and returns
    /// at most `count` of them, with their ids (none if `block` passed
    /// first).
    pub async fn next(
        &mut self,
        block: std::time::Duration,
        count: usize,
    ) -> Result<Vec<(EntryId, Inbound)>, SharedError> {
        let reply: XRead = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(u64::try_from(block.as_millis()).unwrap_or(u64::MAX).max(1))
            .arg("STREAMS")
            .arg(&self.key)
            .arg(&self.last)
            .query_async(&mut self.conn)
            .await?;
        let mut out = Vec::new();
        self.oldest_ms = None;
        for (_, entries) in reply.unwrap_or_default() {
            for (id, fields) in entries {
                self.carried(&fields);
                if let Some(e) = inbound(&self.key, &id, &fields)? {
                    out.push((EntryId::parse(&id).unwrap_or_default(), e));
                }
                if self.oldest_ms.is_none() {
                    self.oldest_ms = entry_ms(&id);
                }
                self.last = id;
            }
        }
        Ok(out)
    }

    /// Caches the records an entry carries (fields named by their keys,
    /// each `<version> <record>`; an empty record: deleted).
    fn carried(&self, fields: &HashMap<String, String>) {
        let Some(cache) = &self.cache else {
            return;
        };
        let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
        for (k, vr) in fields {
            if let Some(key) = k.strip_prefix(&self.prefix)
                && key.contains(':')
                && let Some((v, r)) = vr.split_once(' ')
                && let Ok(v) = v.parse::<Version>()
            {
                cache.committed(key.to_owned(), v, (!r.is_empty()).then(|| r.to_owned()));
            }
        }
    }

    /// When the oldest entry of the last batch was added (Unix ms, by the
    /// Redis server's clock): how far behind its commit the inbox is read.
    pub fn oldest_ms(&self) -> Option<u64> {
        self.oldest_ms
    }
}

/// The time part of a stream entry id (`<unix ms>-<seq>`).
fn entry_ms(id: &str) -> Option<u64> {
    id.split_once('-')?.0.parse().ok()
}

/// Whether a failure was the connection found dropped (worth one more
/// try on the connection the manager makes anew), not a timeout.
fn dropped(e: &SharedError) -> bool {
    matches!(e, SharedError::Redis(r) if !r.is_timeout() && (r.is_connection_dropped() || r.is_io_error()))
}

/// A timer due in the shared store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Due {
    /// One the rules keep on any store.
    Store(Timer),
    /// A call's approval has not come back in time (the node asking died,
    /// or lost Redis): the failure policy decides it.
    Approval(CallId),
}

fn parse_timer(m: &str) -> Option<Due> {
    if let Some(c) = m.strip_prefix("r:") {
        return c.parse().ok().map(|u| Due::Store(Timer::Ring(CallId(u))));
    }
    if let Some(c) = m.strip_prefix("a:") {
        return c.parse().ok().map(|u| Due::Approval(CallId(u)));
    }
    m.strip_prefix("g:")
        .and_then(|d| d.parse().ok())
        .map(|d| Due::Store(Timer::Grace(ConnId(d))))
}

/// Takes one loaded record (key without the prefix, version, JSON; both
/// empty when absent) into `snap`, unless it holds that record already.
fn absorb(snap: &mut Snapshot, key: &str, v: &str, r: &str) -> Result<(), SharedError> {
    fn decode<T: serde::de::DeserializeOwned>(
        key: &str,
        v: &str,
        r: &str,
    ) -> Result<Option<(Version, T)>, SharedError> {
        if r.is_empty() {
            return Ok(None);
        }
        let corrupt = |source| SharedError::Corrupt {
            key: key.to_owned(),
            source,
        };
        let v = v.parse().map_err(|_| SharedError::Corrupt {
            key: key.to_owned(),
            source: serde::de::Error::custom("version"),
        })?;
        Ok(Some((v, serde_json::from_str(r).map_err(corrupt)?)))
    }
    use std::collections::hash_map::Entry::Vacant;
    let Some((kind, id)) = key.split_once(':') else {
        return Ok(());
    };
    match kind {
        "u" => {
            if let Vacant(e) = snap.users.entry(Arc::from(id)) {
                e.insert(decode(key, v, r)?);
            }
        }
        "d" => {
            if let Ok(n) = id.parse()
                && let Vacant(e) = snap.devices.entry(ConnId(n))
            {
                e.insert(decode(key, v, r)?);
            }
        }
        "c" | "h" => {
            let Ok(u) = id.parse() else {
                return Ok(());
            };
            let id = CallId(u);
            if kind == "c" {
                if let Vacant(e) = snap.calls.entry(id) {
                    e.insert(decode(key, v, r)?);
                }
            } else if let Vacant(e) = snap.held.entry(id) {
                e.insert(decode(key, v, r)?);
            }
        }
        _ => {}
    }
    Ok(())
}

/// How many records a node's [`RecordCache`] holds before it starts over.
const CACHE_LIMIT: usize = 100_000;

/// The records a node last loaded or committed, as JSON with their
/// versions (an absent record: empty JSON). A transition runs over them
/// instead of loading, and its commit checks every version it read as
/// always: a record another node changed since is a conflict, whose reply
/// carries the record's current value, and the next attempt runs over that.
/// So a cached record costs nothing when it is fresh (an input of a call
/// whose records only this node writes takes one round trip, its commit)
/// and one commit more when it is stale, never a wrong result. Queries
/// (`read`) never use it: they answer from Redis. Bounded by
/// [`CACHE_LIMIT`]: when full it is emptied and fills again from loads.
#[derive(Debug, Default)]
struct RecordCache {
    records: HashMap<String, (Version, String)>,
}

impl RecordCache {
    fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    fn get(&self, key: &str) -> Option<&(Version, String)> {
        self.records.get(key)
    }

    fn clear(&mut self) {
        self.records.clear();
    }

    fn room(&mut self) {
        if self.records.len() >= CACHE_LIMIT {
            self.records.clear();
        }
    }

    /// A record as Redis returned it (a load, a conflict's reply). A
    /// reply may be older than what a commit of this node cached since,
    /// so a present record replaces only an older one; an absent one
    /// carries no version, so it drops the entry (the next use loads it).
    fn loaded(&mut self, key: &str, v: &str, r: &str) {
        match v.parse::<Version>() {
            Ok(v) if !r.is_empty() => {
                if self.records.get(key).is_none_or(|(have, _)| *have < v) {
                    self.room();
                    self.records.insert(key.to_owned(), (v, r.to_owned()));
                }
            }
            _ => {
                self.records.remove(key);
            }
        }
    }

    /// A record this node committed at version `v` (`None`: deleted).
    fn committed(&mut self, key: String, v: Version, rec: Option<String>) {
        if self.records.get(&key).is_some_and(|(have, _)| *have > v) {
            return;
        }
        self.room();
        self.records.insert(key, (v, rec.unwrap_or_default()));
    }
}

/// A record's part of the commit: its version read, what the commit does
/// with it, and its JSON (of a record only read: when `carry`, see
/// [`InboxReader::feeding`]).
fn op<K, V: serde::Serialize>(
    s: &crate::store::Slot<K, V>,
    carry: bool,
) -> Result<(Version, &'static str, String), SharedError> {
    Ok(match (s.dirty, &s.value) {
        (true, Some(v)) => (s.read, "w", json(v)?),
        (true, None) => (s.read, "d", String::new()),
        (false, Some(v)) if carry => (s.read, "k", json(v)?),
        (false, _) => (s.read, "k", String::new()),
    })
}

fn json<T: serde::Serialize>(rec: &T) -> Result<String, SharedError> {
    serde_json::to_string(rec).map_err(SharedError::Encode)
}

/// The REQUEST notice of a call waiting for its approval (or holding its
/// notices for it), as the approval carried it.
fn request_notice(s: &mut Step<'_, '_>, call_id: CallId) -> Option<Notice> {
    if let Some(c) = s.t.call(&call_id).filter(|c| c.phase == Phase::Approving) {
        return Some(Notice {
            kind: crate::domain::EventKind::Request,
            call_id,
            seq: 1,
            source: c.caller.clone(),
            target: c.callee.clone(),
            caller: c.caller.clone(),
            callee: c.callee.clone(),
            code: 0,
            flags: c.flags,
            param: c.param,
            user_str: c.user_str.clone(),
            decision_required: false,
            initiator: crate::domain::Initiator::Caller,
            at: c.requested_at,
            requested_at: c.requested_at,
        });
    }
    let h = s.t.held(&call_id)?.first()?;
    Some(Notice {
        kind: crate::domain::EventKind::Request,
        seq: 1,
        source: h.caller.clone(),
        target: h.callee.clone(),
        code: 0,
        flags: 0,
        param: 0,
        user_str: Arc::from(""),
        initiator: crate::domain::Initiator::Caller,
        at: h.requested_at,
        decision_required: false,
        ..h.clone()
    })
}

/// The call rules over the shared store: one node's inputs.
#[derive(Clone, Debug)]
pub struct Node {
    store: SharedStore,
    ring_timeout: std::time::Duration,
    /// What a call whose approval timed out in the store gets.
    approval_failure: Verdict,
    /// The latest time an input brought: what a device given up for parking
    /// too much is stamped with.
    now: Time,
}

impl Node {
    pub fn new(store: SharedStore, ring_timeout: std::time::Duration) -> Self {
        Self {
            store,
            ring_timeout,
            approval_failure: Verdict::Refuse {
                code: crate::codes::BUSINESS_UNAVAILABLE,
                initiator: crate::domain::Initiator::Service,
            },
            now: Time::ZERO,
        }
    }

    pub fn store(&mut self) -> &mut SharedStore {
        &mut self.store
    }

    /// Forgets every record this node cached (see [`RecordCache`]).
    pub fn forget_cached(&self) {
        self.store.forget_cached();
    }

    /// Calls waiting for approval longer than `timeout` (their node died
    /// while asking) get `failure`, the failure policy's verdict.
    pub fn time_approvals(&mut self, timeout: std::time::Duration, failure: Verdict) {
        self.store.time_approvals(timeout);
        self.approval_failure = failure;
    }

    /// Runs one input (at `now`, if it has a time of its own) and gives up
    /// the detached devices that parked past their limit, each in a
    /// transition of its own, at the latest time this node has seen.
    async fn run<T>(
        &mut self,
        now: Option<Time>,
        first: Prefetch,
        out: &mut Vec<Effect>,
        mut rule: impl FnMut(&mut Step<'_, '_>, &mut Vec<Effect>) -> T,
    ) -> Result<Option<T>, SharedError> {
        let ring_timeout = self.ring_timeout;
        if let Some(now) = now {
            self.now = self.now.max(now);
        }
        let Some((value, mut overflowed)) = self
            .store
            .transact(&first, out, |t, o| rule(&mut Step { t, ring_timeout }, o))
            .await?
        else {
            return Ok(None);
        };
        let now = self.now;
        while let Some(conn) = overflowed.pop() {
            let first = Prefetch {
                devices: vec![conn],
                ..Prefetch::default()
            };
            let dropped = self
                .store
                .transact(&first, out, |t, o| {
                    Step { t, ring_timeout }.drop_device(conn, now, o)
                })
                .await?;
            if let Some(((), more)) = dropped {
                overflowed.extend(more);
            }
        }
        Ok(Some(value))
    }

    /// A new device of `user` on this node (see [`crate::machine::Machine::attach`]).
    pub async fn attach(
        &mut self,
        conn: ConnId,
        user: UserId,
        resume_token: Arc<str>,
        max_devices: usize,
        out: &mut Vec<Effect>,
    ) -> Result<Result<(), usize>, SharedError> {
        let node = self.store.node;
        let first = Prefetch {
            users: vec![user.clone()],
            ..Prefetch::default()
        };
        Ok(self
            .run(None, first, out, |s, o| {
                s.attach(conn, &user, node, &resume_token, max_devices, o)
            })
            .await?
            .unwrap_or(Err(0)))
    }

    /// A control from a device (see [`crate::machine::Machine::control`]).
    /// `None`: from a stream that no longer holds the device (`epoch`).
    /// `quota`: a REQUEST is answered [`CALLER_OVER_QUOTA`] while its
    /// caller has that many notices pending in the lanes.
    #[allow(clippy::too_many_arguments)]
    pub async fn control(
        &mut self,
        conn: ConnId,
        epoch: Option<u64>,
        ctl: &Control,
        new_call_id: CallId,
        quota: Option<(UserId, usize)>,
        now: Time,
        out: &mut Vec<Effect>,
    ) -> Result<Option<Outcome>, SharedError> {
        // The device, its user (through it) and the peer's user and
        // devices in one load; a REQUEST's call is new.
        let first = Prefetch {
            users: vec![ctl.peer.clone()],
            devices: vec![conn],
            absent: match ctl.kind {
                ControlKind::Request => vec![new_call_id],
                _ => Vec::new(),
            },
            quota: quota.filter(|_| ctl.kind == ControlKind::Request),
            ..Prefetch::default()
        };
        let outcome = self
            .run(Some(now), first, out, |s, o| {
                s.control(conn, epoch, ctl, new_call_id, now, o)
            })
            .await?;
        if self.store.take_over_quota() {
            return Ok(Some(CALLER_OVER_QUOTA));
        }
        Ok(outcome.unwrap_or(Some(CONTENDED)))
    }

    /// The verdict on a call's REQUEST.
    pub async fn approval_done(
        &mut self,
        call_id: CallId,
        verdict: Verdict,
        now: Time,
        out: &mut Vec<Effect>,
    ) -> Result<(), SharedError> {
        self.run(Some(now), Prefetch::call(call_id), out, |s, o| {
            s.approval_done(call_id, verdict, now, o)
        })
        .await
        .map(drop)
    }

    /// A forced FINISH.
    pub async fn force_finish(
        &mut self,
        f: &ForceFinish,
        now: Time,
        out: &mut Vec<Effect>,
    ) -> Result<Outcome, SharedError> {
        Ok(self
            .run(Some(now), Prefetch::user(&f.user), out, |s, o| {
                s.force_finish(f, now, o)
            })
            .await?
            .unwrap_or(CONTENDED))
    }

    /// Fires the timers due at `now`; whichever node fires one, and however
    /// often, it acts once (the rules check the state it expects).
    pub async fn tick(&mut self, now: Time, out: &mut Vec<Effect>) -> Result<(), SharedError> {
        for timer in self.store.due(now, 256).await? {
            match timer {
                Due::Store(Timer::Ring(call_id)) => {
                    self.run(Some(now), Prefetch::call(call_id), out, |s, o| {
                        s.ring_out(call_id, now, o)
                    })
                    .await?;
                }
                Due::Store(Timer::Grace(conn)) => {
                    self.run(Some(now), Prefetch::device(conn), out, |s, o| {
                        s.expire(conn, now, o)
                    })
                    .await?;
                }
                Due::Approval(call_id) => {
                    let failure = self.approval_failure;
                    self.run(Some(now), Prefetch::call(call_id), out, |s, o| {
                        // The business service may not have been asked: its
                        // REQUEST as a notice (the same event id as the
                        // approval's, so a duplicate is known as one).
                        if let Some(request) = request_notice(s, call_id) {
                            o.push(Effect::Notify(request));
                        }
                        s.approval_done(call_id, failure, now, o);
                    })
                    .await?;
                }
            }
        }
        Ok(())
    }

    /// A stream of this node's device ended (see
    /// [`crate::machine::Machine::stream_ended`]).
    pub async fn stream_ended(
        &mut self,
        conn: ConnId,
        epoch: u64,
        keep_until: Option<Time>,
        now: Time,
        out: &mut Vec<Effect>,
    ) -> Result<(), SharedError> {
        self.run(Some(now), Prefetch::device(conn), out, |s, o| {
            s.stream_ended(conn, epoch, keep_until, now, o)
        })
        .await
        .map(drop)
    }

    /// A device of this node goes with it (the node stops and no resume
    /// window is kept): the call it is in ends TERMINATED (100206) for
    /// both parties, as when a single node stops, and the device is
    /// dropped.
    pub async fn end_device(
        &mut self,
        conn: ConnId,
        epoch: u64,
        now: Time,
        out: &mut Vec<Effect>,
    ) -> Result<(), SharedError> {
        self.run(Some(now), Prefetch::device(conn), out, |s, o| {
            let Some(user) =
                s.t.device(&conn)
                    .filter(|d| d.epoch == epoch)
                    .map(|d| d.user.clone())
            else {
                return;
            };
            let call = s.t.user(&user).and_then(|u| u.call);
            let involved = call.and_then(|id| s.t.call(&id)).is_some_and(|c| {
                c.caller_conn == conn
                    || match &c.phase {
                        Phase::Approving => false,
                        Phase::Ringing { ringing, .. } => ringing.contains(&conn),
                        Phase::Talking { callee_conn, .. } => *callee_conn == conn,
                    }
            });
            if involved {
                let f = ForceFinish {
                    user,
                    only: call,
                    code: crate::codes::TERMINATED,
                    flags: 0,
                    param: 0,
                    user_str: Arc::from("the call service is shutting down"),
                };
                s.force_finish(&f, now, o);
            }
        })
        .await?;
        // A transition of its own: events for a device dropped in the same
        // transition would not be routed to it.
        self.run(Some(now), Prefetch::device(conn), out, |s, o| {
            s.stream_ended(conn, epoch, None, now, o)
        })
        .await
        .map(drop)
    }

    /// A new stream on this node takes the device `token` names, wherever
    /// it was (see [`crate::machine::Machine::resume`]).
    pub async fn resume(
        &mut self,
        user: &UserId,
        token: &str,
        next_token: Arc<str>,
    ) -> Result<Option<(ConnId, u64, std::collections::VecDeque<Outgoing>)>, SharedError> {
        let node = self.store.node;
        let mut before = None;
        let resumed = self
            .run(None, Prefetch::user(user), &mut Vec::new(), |s, _| {
                before =
                    s.t.device_by_token(token)
                        .and_then(|c| s.t.device(&c))
                        .map(|d| (d.node, d.epoch, d.attached));
                s.resume(user, token, &next_token, node)
            })
            .await?
            .flatten();
        let (Some((conn, epoch, mut parked)), Some((old_node, old_epoch, attached))) =
            (resumed, before)
        else {
            return Ok(None);
        };
        // Taken from a stream another node still holds (its client's path
        // broke without that node noticing): that node ends it, as one
        // node ends the stream a resume replaces. After the commit, not in
        // it: if this node dies in between, the old stream stays deaf
        // until keep-alive ends it, which is all it was before.
        if attached && old_node != node {
            self.store.moved(old_node, conn, old_epoch).await?;
        }
        // The events the old stream was sent last may never have reached
        // the client (its node died, or the path broke, with them on the
        // way): those still in the old node's inbox (kept a while after
        // reading, see `trim_inbox_read`) go first, ahead of what was
        // parked since. The client drops those it had already.
        let resent: Vec<Outgoing> = self
            .store
            .inbox(old_node, "0-0", RESEND_SCAN)
            .await?
            .into_iter()
            .filter_map(|(_, entry)| match entry {
                Inbound::Event {
                    conn: c,
                    epoch: e,
                    event,
                } if c == conn && e == old_epoch => Some(Outgoing::Event(event)),
                _ => None,
            })
            .collect();
        for o in resent.into_iter().rev() {
            parked.push_front(o);
        }
        Ok(Some((conn, epoch, parked)))
    }

    /// Reaps the nodes whose lease ran out before `now`: each of their
    /// attached devices becomes detached until `now + grace`, as if its
    /// stream had broken, so its user's call goes on if the client resumes
    /// in time (through any node). What the dead node had not read of its
    /// inbox is taken over: its devices' events are parked for them. (Its
    /// notice lanes are claimed by the live nodes, see
    /// [`SharedStore::claim_lanes`].) A node
    /// is forgotten once none of its devices is left. Returns the devices
    /// detached.
    pub async fn reap(
        &mut self,
        now: Time,
        grace: std::time::Duration,
        out: &mut Vec<Effect>,
    ) -> Result<usize, SharedError> {
        let mut detached = 0;
        for dead in self.store.expired_nodes(now).await? {
            // Marked first: from then on it cannot renew late and go on
            // with devices reaped under it.
            if dead == self.store.node || !self.store.mark_reaping(dead, now).await? {
                continue;
            }
            detached += self.reap_node(dead, now, grace, false, out).await?;
        }
        Ok(detached)
    }

    /// Reaps this node's own lease, which ran out (it was cut off from the
    /// store, or the store was away, for longer than a lease): what a
    /// reaper would do to it (its devices still attached in the store are
    /// detached for `grace`, what its inbox holds is parked for them), then
    /// the lease goes, so the node can join again at once. Without this a
    /// node nobody else reaps (the only one) would never join again.
    pub async fn reap_self(
        &mut self,
        now: Time,
        grace: std::time::Duration,
        out: &mut Vec<Effect>,
    ) -> Result<usize, SharedError> {
        let me = self.store.node;
        // Not checked against its lease: a renewal whose reply was lost
        // (Redis stopped, then continued) may have renewed it, and the
        // devices the store has attached here are served by nobody all
        // the same (the node has ended its streams and takes none).
        let detached = self.reap_node(me, now, grace, true, out).await?;
        self.store.leave().await?;
        Ok(detached)
    }

    /// Reaps one node whose lease ran out (see [`Node::reap`]); `own`: this
    /// node's own, whatever its lease says.
    async fn reap_node(
        &mut self,
        dead: NodeId,
        now: Time,
        grace: std::time::Duration,
        own: bool,
        out: &mut Vec<Effect>,
    ) -> Result<usize, SharedError> {
        let mut detached = 0;
        {
            let unread = self.store.inbox(dead, "0-0", 100_000).await?;
            let last = unread.last().map(|(id, _)| id.clone());
            let mut events: HashMap<ConnId, Vec<(u64, Event)>> = HashMap::new();
            for (_, entry) in unread {
                if let Inbound::Event { conn, epoch, event } = entry {
                    events.entry(conn).or_default().push((epoch, event));
                }
            }
            for conn in self.store.node_devices(dead).await? {
                // The node may have come back and joined again meanwhile:
                // its devices are its own again.
                if !own && !self.store.lease_expired(dead, now).await? {
                    break;
                }
                let pending = events.remove(&conn).unwrap_or_default();
                let done = self
                    .run(Some(now), Prefetch::device(conn), out, |s, o| {
                        let epoch =
                            s.t.device(&conn)
                                .filter(|d| d.attached && d.node == dead)
                                .map(|d| d.epoch);
                        if let Some(epoch) = epoch {
                            s.stream_ended(conn, epoch, Some(now + grace), now, o);
                            if let Some(d) = s.t.device_mut(&conn) {
                                let sent = pending.iter().filter(|(e, _)| *e == epoch);
                                d.parked
                                    .extend(sent.map(|(_, ev)| Outgoing::Event(ev.clone())));
                            }
                        }
                        epoch.is_some()
                    })
                    .await?;
                detached += usize::from(done == Some(true));
            }
            // A node that joined again meanwhile reads its inbox, and its
            // fresh lease stays.
            if !own && !self.store.lease_expired(dead, now).await? {
                return Ok(detached);
            }
            if let Some(last) = last {
                self.store.trim_inbox(dead, &last).await?;
            }
            self.store.forget(dead, now).await?;
        }
        Ok(detached)
    }

    /// A user's call, read from the store (for checks and queries).
    pub async fn user_call(&mut self, user: &str) -> Result<Option<Call>, SharedError> {
        let user: UserId = Arc::from(user);
        self.store
            .read(|t| {
                let id = t.user(&user).and_then(|u| u.call);
                id.and_then(|id| t.call(&id).cloned())
            })
            .await
    }
}

#[cfg(test)]
mod tests;
