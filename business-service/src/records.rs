//! Call detail records in SQLite.
//!
//! Every notice is folded into its call's record. Each event type sets only
//! its own columns and its own bit of the row's `kinds`, so the record comes
//! out the same whatever order the events arrive in, and a redelivered or
//! late notice changes nothing (the `row` module). A record is `complete`
//! when every event of its call is in: REQUEST and a non-zero REPLY for a call that never
//! started (a *missed* call: no answer, cancelled, offline, busy, rejected,
//! refused), or REQUEST, REPLY 0, START and FINISH.
//!
//! One thread owns the connection ([`Records`] is its handle); a notice is
//! acknowledged only once committed, so the hook answers it only after it
//! is written (WAL with `synchronous=NORMAL`: safe across a crash of the
//! process, no fsync per commit).
//!
//! **Approvals never wait for a commit.** The call service waits for an
//! approval's answer, so an approved REQUEST is not committed before it:
//! it is appended to the *approval journal* (two segment files beside the
//! database, one `write` of a few hundred bytes) and then queued for the
//! writer like a notice. The writer empties a segment once appends have
//! moved to the other and everything in it is committed; it never takes
//! the appenders' lock, so an approval never waits for it. The journal is
//! replayed on start. What a crash of the process loses, point by point:
//! before the journal append, nothing (the approval is not answered; the
//! call service's failure policy decides and delivers the REQUEST as a
//! notice); after it, nothing (the next start commits the REQUEST, also if
//! the answer never left); a notice, nothing that was acknowledged (a
//! notice is acknowledged only once committed, and the call service
//! redelivers the others). Like `synchronous=NORMAL`, the journal survives
//! a crash of the process, not of the machine.
//!
//! **A failed commit** answers its notices with the error (the call
//! service keeps them and sends them again; the service reports
//! NOT_SERVING) and carries its approvals, answered already, into the next
//! commit, or one after [`RETRY_FIRST`] (doubling to [`RETRY_MAX`]) if
//! nothing else comes: until they are in, their journal segment cannot be
//! emptied. At most [`CARRIED_MAX`] are carried; the rest wait in the
//! journal for the next start, as do all of them if the process ends
//! first, so a crash then loses nothing either.
//!
//! **Few commits.** Nobody on the calling path waits for the writer, so it
//! takes whatever is waiting, up to [`CHUNK`] notices, into one transaction:
//! under load a commit carries hundreds of events, and the pages it writes
//! (a page per B-tree touched, whatever the rows in it) are shared by them.
//! It gathers by sleeping out the linger once, not by waking for each job.
//!
//! **Cheap writes.** A transaction writes each call it touches once,
//! whatever the events it brought: one upsert of the whole row, folded in
//! memory. The rows of calls in progress stay in the writer's memory as
//! committed (bounded, `RowCache`), so a call's later events do not read
//! its row back; a call not there is read once. Statements are prepared
//! once and cached. The table grows at its right edge (call ids are
//! time-ordered); there is no index by user, whose every new entry wrote a
//! random page (lookups by user scan, see the migrations), and no table of
//! events (the row's `kinds` recognises a redelivery). WAL
//! checkpoints stay SQLite's own, in the writer after a commit: moved to a
//! thread of their own (tried), they never caught up with a writer that
//! never pauses, the WAL could not restart, and the service's memory grew
//! with it (to 108 MiB in a 10-minute soak).
//!
//! Readers (the operator CLI) open their own connection; WAL mode lets them
//! read while the service writes.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prost::Message;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};
use videocall_proto::v1 as pb;

mod row;
use row::Row;

/// Jobs waiting for the writer thread; senders wait when it is full
/// (backpressure on the hook, hence on the call service's lanes).
const QUEUE: usize = 1024;
/// The most notices the writer takes into one transaction (a job bigger
/// than this, one batch from the call service, is committed whole): a
/// notice's acknowledgement waits for at most this many, and for the
/// approvals a failed commit carried, if any.
pub const CHUNK: usize = 256;
/// The most approvals a failed commit carries into the next (held in
/// memory meanwhile); any more stay in the journal, unemptied, until the
/// next start stores them.
const CARRIED_MAX: usize = QUEUE;
/// How long the writer gathers jobs after the first before it commits:
/// fewer, larger transactions (each writes every page it touched, whatever
/// the rows in it: at 2,000 calls/s half the writer's time went to writing
/// and checkpointing WAL frames with 5 ms), and a notice's acknowledgement
/// later by at most this. Approvals never wait for it; the call service's
/// lanes keep a batch of up to 256 notices each in flight meanwhile.
pub const LINGER: std::time::Duration = std::time::Duration::from_millis(20);
/// WAL pages before SQLite checkpoints them into the database (its default
/// is 1,000): a page written by many commits is copied back once, and the
/// checkpoint's two fsyncs come a tenth as often. The WAL file stays at
/// most about this size (40 MiB of 4 KiB pages) and restarts after each.
const AUTOCHECKPOINT_PAGES: i64 = 10_000;
/// After a failed commit, its approvals are tried again with the next
/// transaction, or after this long if nothing else comes; the wait doubles
/// up to [`RETRY_MAX`] while commits fail.
pub const RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(50);
pub const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// The schema, one entry per version; `PRAGMA user_version` says how many
/// have been applied. Only ever append.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE events (
    event_id    TEXT PRIMARY KEY,
    call_id     TEXT NOT NULL,
    sequence    INTEGER NOT NULL,
    event_type  INTEGER NOT NULL,
    source_user TEXT NOT NULL,
    target_user TEXT NOT NULL,
    error_code  INTEGER NOT NULL,
    flags       INTEGER NOT NULL,
    param       INTEGER NOT NULL,
    user_str    TEXT NOT NULL,
    initiator   INTEGER NOT NULL,
    time_ms     INTEGER NOT NULL
);
CREATE INDEX events_by_call ON events (call_id, sequence);
CREATE TABLE calls (
    call_id      TEXT PRIMARY KEY,
    caller       TEXT NOT NULL,
    callee       TEXT NOT NULL,
    flags        INTEGER,
    param        INTEGER,
    user_str     TEXT,
    requested_ms INTEGER,
    rang_ms      INTEGER,
    answered_ms  INTEGER,
    ended_ms     INTEGER,
    duration_ms  INTEGER,
    end_code     INTEGER,
    ended_by     TEXT,
    room_id      INTEGER,
    missed       INTEGER NOT NULL DEFAULT 0,
    complete     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX calls_by_caller ON calls (caller, requested_ms);
CREATE INDEX calls_by_callee ON calls (callee, requested_ms);
"#,
    // A call's events are counted in its row, not by looking them up: one index
    // fewer to write, and no query per event.
    r#"
ALTER TABLE calls ADD COLUMN events INTEGER NOT NULL DEFAULT 0;
UPDATE calls SET events = (SELECT COUNT(*) FROM events e WHERE e.call_id = calls.call_id);
DROP INDEX events_by_call;
"#,
    // Events kept in their key's order (WITHOUT ROWID): one B-tree to write
    // per event instead of a table and its key's index. (The same for calls
    // was tried: no fewer instructions, their rows are updated in place.)
    r#"
CREATE TABLE events_by_id (
    event_id    TEXT PRIMARY KEY,
    call_id     TEXT NOT NULL,
    sequence    INTEGER NOT NULL,
    event_type  INTEGER NOT NULL,
    source_user TEXT NOT NULL,
    target_user TEXT NOT NULL,
    error_code  INTEGER NOT NULL,
    flags       INTEGER NOT NULL,
    param       INTEGER NOT NULL,
    user_str    TEXT NOT NULL,
    initiator   INTEGER NOT NULL,
    time_ms     INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO events_by_id SELECT * FROM events;
DROP TABLE events;
ALTER TABLE events_by_id RENAME TO events;
"#,
    // No index by user: each new call wrote a random page of each of the
    // two (on every commit, a page per new call), half of all the records'
    // writes and a third of the writer's CPU. Lookups by user scan the
    // calls instead, as the most recent calls always have (the operator
    // CLI's queries; nothing on the calling path reads).
    r#"
DROP INDEX calls_by_caller;
DROP INDEX calls_by_callee;
"#,
    // Redelivered events recognised by their call's row, not by a table of
    // every event: `kinds` has a bit per event type that is in (see the
    // `row` module), and each call's row is written once per transaction.
    // The events table was half of every commit's statements and most of
    // its bytes.
    r#"
ALTER TABLE calls ADD COLUMN kinds INTEGER NOT NULL DEFAULT 0;
UPDATE calls SET kinds = k.kinds
FROM (SELECT call_id, SUM(DISTINCT 1 << (event_type - 1)) AS kinds
      FROM events WHERE event_type BETWEEN 1 AND 4 GROUP BY call_id) AS k
WHERE k.call_id = calls.call_id;
DROP TABLE events;
ALTER TABLE calls DROP COLUMN events;
"#,
];

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum RecordsError {
    #[error("call records database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("call records database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("call records not written: {0}")]
    Write(String),
    #[error("approval journal {0}: {1}")]
    Journal(PathBuf, #[source] std::io::Error),
    #[error("the call records writer has stopped")]
    Stopped,
    #[error("cannot start the call records writer: {0}")]
    Thread(#[source] std::io::Error),
}

/// One call's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallRecord {
    pub call_id: String,
    pub caller: String,
    pub callee: String,
    pub flags: Option<u32>,
    pub param: Option<u32>,
    pub user_str: Option<String>,
    /// Unix milliseconds.
    pub requested_ms: Option<i64>,
    /// When the business service allowed the call, right before it rang.
    pub rang_ms: Option<i64>,
    pub answered_ms: Option<i64>,
    pub ended_ms: Option<i64>,
    pub duration_ms: Option<i64>,
    pub end_code: Option<u32>,
    /// The user who ended the call, or `service` / `business`.
    pub ended_by: Option<String>,
    pub room_id: Option<u32>,
    pub missed: bool,
    pub complete: bool,
}

/// A notice to store and, for an approved REQUEST, when it was allowed.
type Entry = (pb::CallEventNotice, Option<i64>);

/// Notices to store together. Each has, for an approved REQUEST, when the
/// business service allowed it.
struct Job {
    notices: Vec<Entry>,
    then: Then,
}

/// What the writer does once a job is committed.
enum Then {
    /// Tells the sender how the commit went.
    Acknowledge(oneshot::Sender<Result<(), String>>),
    /// An approval, answered already: its REQUEST is in this journal
    /// segment, which may be emptied once all of its frames are committed.
    Journaled(usize),
}

/// Handle to the writer thread. Cheap to clone; the thread ends when the
/// last handle is dropped.
#[derive(Clone, Debug)]
pub struct Records {
    queue: mpsc::Sender<Job>,
    journal: Arc<Journal>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("notices", &self.notices.len())
            .finish()
    }
}

/// Opens (creating and migrating) the database at `path`.
pub fn open(path: &Path) -> Result<Connection, RecordsError> {
    let open_err = |source| RecordsError::Open {
        path: path.to_owned(),
        source,
    };
    let mut conn = Connection::open(path).map_err(open_err)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(open_err)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(open_err)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(open_err)?;
    migrate(&mut conn).map_err(open_err)?;
    conn.pragma_update(None, "wal_autocheckpoint", AUTOCHECKPOINT_PAGES)
        .map_err(open_err)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let applied = usize::try_from(version).unwrap_or(0);
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(
            None,
            "user_version",
            i64::try_from(i + 1).unwrap_or(i64::MAX),
        )?;
        tx.commit()?;
    }
    Ok(())
}

/// The approval journal's first segment: beside the database, as SQLite's
/// own `-wal`.
pub fn journal_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push("-approvals");
    PathBuf::from(p)
}

/// The journal's segments: [`journal_path`] and the same with `.2`.
fn segment_paths(db: &Path) -> [PathBuf; 2] {
    let first = journal_path(db);
    let mut second = first.clone().into_os_string();
    second.push(".2");
    [first, PathBuf::from(second)]
}

/// Bytes in the active segment past which an append moves to the other
/// one, if the writer has emptied it: a crash replays at most about twice
/// this (idempotently), and a segment is emptied about once a second at
/// 2,000 approvals/s.
const SEGMENT_BYTES: u64 = 256 * 1024;

/// A segment's states. Appenders, under the journal's lock, move a segment
/// from `CLEAN` to `ACTIVE` and from `ACTIVE` to `FULL`; only the writer
/// moves it from `FULL` to `CLEAN`, once every frame in it is committed
/// and the file is truncated.
const ACTIVE: u8 = 0;
const FULL: u8 = 1;
const CLEAN: u8 = 2;

/// Approved REQUESTs not yet known to be committed, appended before the
/// approval is answered: `[length u32 LE][rang_ms i64 LE][CallEventNotice]`
/// (protobuf), one frame per approval, in two segment files. Replayed into
/// the database on start (a replay changes nothing for a REQUEST already
/// in: its call's row has it).
///
/// **An approval never waits for the writer.** Appenders take the
/// journal's lock only among themselves; the writer, which runs at a
/// lower priority and may be preempted anywhere, never takes it: it empties a
/// segment nobody appends to any more (`FULL`), and hands it back through
/// the segment's state. An append is one `write` and nothing else.
#[derive(Debug)]
struct Journal {
    segments: [Segment; 2],
    /// Bytes past which appenders move on ([`SEGMENT_BYTES`]).
    segment_bytes: u64,
    /// The appenders' lock (held for one `write`, never across an
    /// `.await`): which segment they append to, and its length.
    active: Mutex<Appending>,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    /// Opened for appending: a write goes to the end, also after a truncate.
    file: File,
    state: AtomicU8,
    /// Frames appended since the segment was last emptied. Counted under
    /// the appenders' lock; final once the segment is `FULL`, and published
    /// to the writer by that store.
    appended: AtomicU64,
}

#[derive(Debug)]
struct Appending {
    segment: usize,
    bytes: u64,
}

impl Journal {
    /// Opens the journal's segments, returning the frames left in them by
    /// the previous run (a torn last frame, from a crash in the middle of
    /// an append, ends a segment's list: it was never acknowledged). The
    /// caller commits them, then calls [`Journal::reset`].
    fn open(paths: [PathBuf; 2], segment_bytes: u64) -> Result<(Self, Vec<Entry>), RecordsError> {
        let mut left = Vec::new();
        let [first, second] = paths.map(|path| Segment::open(path, &mut left));
        let journal = Self {
            segments: [first?, second?],
            segment_bytes,
            active: Mutex::new(Appending {
                segment: 0,
                bytes: 0,
            }),
        };
        Ok((journal, left))
    }

    /// Empties both segments (what they held is committed) before the
    /// writer starts: appends go to the first.
    fn reset(&self) -> Result<(), RecordsError> {
        for (i, s) in self.segments.iter().enumerate() {
            s.file
                .set_len(0)
                .map_err(|e| RecordsError::Journal(s.path.clone(), e))?;
            s.appended.store(0, Ordering::Relaxed);
            s.state
                .store(if i == 0 { ACTIVE } else { CLEAN }, Ordering::Release);
        }
        Ok(())
    }

    /// Appends one frame in one `write` (the kernel's page cache: it
    /// survives a crash of the process, as a `synchronous=NORMAL` commit
    /// does). Returns the segment it went to, for the writer to count.
    fn append(&self, n: &pb::CallEventNotice, rang_ms: Option<i64>) -> Result<usize, RecordsError> {
        let body = n.encoded_len() + 8;
        let mut frame = Vec::with_capacity(4 + body);
        frame.extend_from_slice(&u32::try_from(body).unwrap_or(u32::MAX).to_le_bytes());
        frame.extend_from_slice(&rang_ms.unwrap_or(i64::MIN).to_le_bytes());
        n.encode(&mut frame)
            .map_err(|e| RecordsError::Write(e.to_string()))?;
        let mut a = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let other = 1 - a.segment;
        if a.bytes >= self.segment_bytes
            && self.segments[other].state.load(Ordering::Acquire) == CLEAN
        {
            self.segments[other].state.store(ACTIVE, Ordering::Relaxed);
            self.segments[a.segment]
                .state
                .store(FULL, Ordering::Release);
            a.segment = other;
            a.bytes = 0;
        }
        let s = &self.segments[a.segment];
        if let Err(e) = (&s.file).write_all(&frame) {
            // A torn frame would end the replay of the frames after it.
            let _ = s.file.set_len(a.bytes);
            return Err(RecordsError::Journal(s.path.clone(), e));
        }
        a.bytes += frame.len() as u64;
        s.appended.fetch_add(1, Ordering::Relaxed);
        Ok(a.segment)
    }

    /// The writer's side: empties segment `i` if appenders have left it
    /// and every frame in it is committed (`committed` of them, counted by
    /// the writer since it was last emptied), and hands it back.
    fn empty_if_committed(&self, i: usize, committed: &mut u64) {
        let s = &self.segments[i];
        if s.state.load(Ordering::Acquire) != FULL
            || s.appended.load(Ordering::Relaxed) != *committed
        {
            return;
        }
        match s.file.set_len(0) {
            Ok(()) => {
                *committed = 0;
                s.appended.store(0, Ordering::Relaxed);
                s.state.store(CLEAN, Ordering::Release);
            }
            Err(e) => {
                tracing::warn!(path = %s.path.display(), error = %e, "approval journal not emptied");
            }
        }
    }
}

impl Segment {
    /// Opens a segment, adding its frames to `left`.
    fn open(path: PathBuf, left: &mut Vec<Entry>) -> Result<Self, RecordsError> {
        let io = |e| RecordsError::Journal(path.clone(), e);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        let mut rest = &bytes[..];
        while rest.len() >= 12 {
            let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            if len < 8 || rest.len() < 4 + len {
                break;
            }
            let rang = i64::from_le_bytes(rest[4..12].try_into().unwrap_or_default());
            match pb::CallEventNotice::decode(&rest[12..4 + len]) {
                Ok(n) => left.push((n, (rang != i64::MIN).then_some(rang))),
                Err(_) => break,
            }
            rest = &rest[4 + len..];
        }
        if !rest.is_empty() {
            tracing::warn!(path = %path.display(), bytes = rest.len(), "approval journal: torn last frame ignored");
        }
        Ok(Self {
            path,
            file,
            state: AtomicU8::new(CLEAN),
            appended: AtomicU64::new(0),
        })
    }
}

impl Records {
    /// Opens the database, stores what the approval journal holds from the
    /// previous run, and starts the writer thread.
    pub fn start(path: &Path) -> Result<Self, RecordsError> {
        Self::start_with(path, SEGMENT_BYTES, None)
    }

    /// With segments of `segment_bytes` and, if given, another wait for
    /// the database's write lock than [`open`]'s.
    fn start_with(
        path: &Path,
        segment_bytes: u64,
        busy: Option<std::time::Duration>,
    ) -> Result<Self, RecordsError> {
        let conn = open(path)?;
        if let Some(busy) = busy {
            conn.busy_timeout(busy)?;
        }
        let (journal, left) = Journal::open(segment_paths(path), segment_bytes)?;
        let mut store = Store::new(conn);
        if !left.is_empty() {
            store.commit(left.iter()).map_err(RecordsError::Write)?;
            tracing::info!(approvals = left.len(), "approval journal replayed");
        }
        journal.reset()?;
        let journal = Arc::new(journal);
        let (queue, rx) = mpsc::channel(QUEUE);
        let writer_journal = journal.clone();
        std::thread::Builder::new()
            .name("call-records".into())
            .spawn(move || writer(store, rx, writer_journal))
            .map_err(RecordsError::Thread)?;
        Ok(Self { queue, journal })
    }

    /// Stores an approval's REQUEST (with when it was allowed, if it was):
    /// returns once it is in the journal, not waiting for any commit; the
    /// writer commits it with the notices.
    pub async fn approval(
        &self,
        notice: pb::CallEventNotice,
        rang_ms: Option<i64>,
    ) -> Result<(), RecordsError> {
        // Room in the queue first: an approval dropped while it waits (its
        // deadline passed) must not leave a frame in the journal that no
        // job will ever count as committed, or its segment would never be
        // emptied.
        let permit = self
            .queue
            .reserve()
            .await
            .map_err(|_| RecordsError::Stopped)?;
        let segment = self.journal.append(&notice, rang_ms)?;
        permit.send(Job {
            notices: vec![(notice, rang_ms)],
            then: Then::Journaled(segment),
        });
        Ok(())
    }

    /// Returns once everything stored before is committed (approvals are
    /// answered before that): how a shutdown leaves the database complete
    /// without the next start's replay.
    pub async fn flush(&self) -> Result<(), RecordsError> {
        self.send(Vec::new()).await
    }

    /// Stores a notice and returns once it is committed.
    pub async fn store(&self, notice: pb::CallEventNotice) -> Result<(), RecordsError> {
        self.send(vec![(notice, None)]).await
    }

    /// Stores several notices and returns once all are committed (in one
    /// transaction, with whatever else was waiting).
    pub async fn store_all(&self, notices: Vec<pb::CallEventNotice>) -> Result<(), RecordsError> {
        self.send(notices.into_iter().map(|n| (n, None)).collect())
            .await
    }

    async fn send(&self, notices: Vec<Entry>) -> Result<(), RecordsError> {
        let (done, rx) = oneshot::channel();
        self.queue
            .send(Job {
                notices,
                then: Then::Acknowledge(done),
            })
            .await
            .map_err(|_| RecordsError::Stopped)?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(RecordsError::Write(e)),
            Err(_) => Err(RecordsError::Stopped),
        }
    }
}

/// The columns of a [`CallRecord`], in [`record`]'s order (a macro, for
/// `concat!`).
macro_rules! columns {
    () => {
        "call_id, caller, callee, flags, param, user_str, requested_ms, rang_ms, answered_ms,
        ended_ms, duration_ms, end_code, ended_by, room_id, missed, complete"
    };
}
/// The writer's side of the database: its connection, and the rows of the
/// calls in progress, as last committed, so that a call's next events fold
/// into its row without reading it back.
struct Store {
    conn: Connection,
    rows: RowCache,
}

/// Rows of calls not yet complete, in two generations: a lookup moves a row
/// to the current one; when that holds [`ROWS`], the previous generation is
/// dropped and the current one takes its place. A row dropped so is read
/// from the database when its call's next event comes. Bounded by
/// 2 × [`ROWS`] rows (about 200 bytes each), O(1) per event.
#[derive(Default)]
struct RowCache {
    current: HashMap<String, Row>,
    previous: HashMap<String, Row>,
}

/// Rows kept per generation of the [`RowCache`]: more than the calls in
/// progress at a few thousand calls/s of minutes-long calls' events.
const ROWS: usize = 16_384;

impl RowCache {
    fn take(&mut self, call_id: &str) -> Option<Row> {
        self.current
            .remove(call_id)
            .or_else(|| self.previous.remove(call_id))
    }

    fn put(&mut self, row: Row) {
        if self.current.len() >= ROWS {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(row.record.call_id.clone(), row);
    }

    fn clear(&mut self) {
        self.current.clear();
        self.previous.clear();
    }
}

impl Store {
    fn new(conn: Connection) -> Self {
        Self {
            conn,
            rows: RowCache::default(),
        }
    }

    /// Commits `notices` in one transaction: each call's events fold into
    /// its row (from the cache, else read, else new), and each row they
    /// changed is written once.
    fn commit<'a>(&mut self, notices: impl IntoIterator<Item = &'a Entry>) -> Result<(), String> {
        // The calls this transaction touches, in the order they came.
        let mut touched: Vec<(Row, bool)> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        let conn = &self.conn;
        // The write lock first: a transaction that reads before it writes
        // could not take it later while another connection holds it
        // (SQLite answers BUSY at once instead of waiting). BEGIN and
        // COMMIT prepared once, like the rest: parsed, they were a tenth of
        // a small transaction's instructions.
        let result = conn
            .prepare_cached("BEGIN IMMEDIATE")
            .and_then(|mut begin| begin.execute([]));
        let result = result.and_then(|_| {
            for (n, rang_ms) in notices {
                let i = match index.get(n.call_id.as_str()) {
                    Some(&i) => i,
                    None => {
                        let row = match self.rows.take(&n.call_id) {
                            Some(row) => row,
                            None => read_row(conn, &n.call_id)?.unwrap_or_else(|| Row::new(n)),
                        };
                        touched.push((row, false));
                        index.insert(&n.call_id, touched.len() - 1);
                        touched.len() - 1
                    }
                };
                let (row, changed) = &mut touched[i];
                *changed |= row.fold(n, *rang_ms);
            }
            for (row, _) in touched.iter().filter(|(_, changed)| *changed) {
                write_row(conn, row)?;
            }
            conn.prepare_cached("COMMIT")?.execute([]).map(|_| ())
        });
        match result {
            Ok(()) => {
                // A complete call's row is not looked for again (a late
                // duplicate reads it and changes nothing).
                for (row, _) in touched {
                    if !row.record.complete {
                        self.rows.put(row);
                    }
                }
                Ok(())
            }
            Err(e) => {
                if !conn.is_autocommit() {
                    let _ = conn.execute_batch("ROLLBACK");
                }
                // What the cache holds may be newer than the database: the
                // rows are read again.
                self.rows.clear();
                tracing::error!(error = %e, "call records not written");
                Err(e.to_string())
            }
        }
    }
}

/// A call's row as committed, if it has one.
fn read_row(conn: &Connection, call_id: &str) -> rusqlite::Result<Option<Row>> {
    conn.prepare_cached(concat!(
        "SELECT ",
        columns!(),
        ", kinds FROM calls WHERE call_id = ?1"
    ))?
    .query_row(params![call_id], |r| {
        Ok(Row {
            record: record(r)?,
            kinds: r.get(16)?,
        })
    })
    .optional()
}

/// Writes a call's whole row, new or not: one statement whatever the
/// events that changed it.
fn write_row(conn: &Connection, row: &Row) -> rusqlite::Result<()> {
    let r = &row.record;
    conn.prepare_cached(concat!(
        "INSERT INTO calls (",
        columns!(),
        ", kinds)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)
         ON CONFLICT (call_id) DO UPDATE SET flags = excluded.flags, param = excluded.param,
            user_str = excluded.user_str, requested_ms = excluded.requested_ms,
            rang_ms = excluded.rang_ms, answered_ms = excluded.answered_ms,
            ended_ms = excluded.ended_ms, duration_ms = excluded.duration_ms,
            end_code = excluded.end_code, ended_by = excluded.ended_by, room_id = excluded.room_id,
            missed = excluded.missed, complete = excluded.complete, kinds = excluded.kinds"
    ))?
    .execute(params![
        r.call_id,
        r.caller,
        r.callee,
        r.flags,
        r.param,
        r.user_str,
        r.requested_ms,
        r.rang_ms,
        r.answered_ms,
        r.ended_ms,
        r.duration_ms,
        r.end_code,
        r.ended_by,
        r.room_id,
        r.missed,
        r.complete,
        row.kinds
    ])?;
    Ok(())
}

/// The writer thread: what arrives within [`LINGER`] of the first job, up
/// to [`CHUNK`] notices, in one transaction. It waits on its queue in a
/// runtime of its own (the SQLite calls block this thread, and only it);
/// it ends when the queue is closed (every handle dropped).
fn writer(store: Store, rx: mpsc::Receiver<Job>, journal: Arc<Journal>) {
    background_priority();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            // The queue closes with this thread: every store says Stopped.
            tracing::error!(error = %e, "call records writer cannot start");
            return;
        }
    };
    runtime.block_on(write_loop(store, rx, journal));
}

/// Lowers this thread's CPU priority (nice 10): on a busy machine the
/// approvals, and the call service beside them, go first; the writer's
/// queue grows meanwhile, and its transactions with it.
fn background_priority() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 10) {
        tracing::debug!(error = %e, "call records writer keeps its priority");
    }
}

async fn write_loop(mut store: Store, mut rx: mpsc::Receiver<Job>, journal: Arc<Journal>) {
    // Journal frames committed, per segment, since it was last emptied.
    let mut committed = [0u64; 2];
    // Approvals whose commit failed, for the next one (at most
    // CARRIED_MAX): until they are in, their journal segment cannot be
    // emptied.
    let mut carried: Vec<Job> = Vec::new();
    // How long a retry waits for something else to commit with.
    let mut wait = RETRY_FIRST;
    let mut open = true;
    loop {
        let mut jobs = std::mem::take(&mut carried);
        let retrying = jobs.len();
        if jobs.is_empty() {
            match rx.recv().await {
                Some(job) => jobs.push(job),
                None => return,
            }
        } else if open {
            tokio::select! {
                job = rx.recv() => match job {
                    Some(job) => jobs.push(job),
                    None => open = false,
                },
                () = tokio::time::sleep(wait) => {}
            }
        }
        let deadline = tokio::time::Instant::now() + LINGER;
        // Carried approvals do not count: a retry takes in as much new
        // as any transaction, so the queue keeps draining.
        let mut count = jobs[retrying..].iter().map(|j| j.notices.len()).sum();
        // What waits already; then, unless that fills a transaction, one
        // sleep for the rest of the linger and what came meanwhile: one
        // wake-up per transaction, not one per job (the senders' wake-ups
        // cost the approvals' threads a system call each).
        take_waiting(&mut rx, &mut jobs, &mut count);
        if count < CHUNK {
            tokio::time::sleep_until(deadline).await;
            take_waiting(&mut rx, &mut jobs, &mut count);
        }
        let result = store.commit(jobs.iter().flat_map(|j| j.notices.iter()));
        if result.is_ok() {
            wait = RETRY_FIRST;
            for job in &jobs {
                if let Then::Journaled(segment) = job.then {
                    committed[segment] += 1;
                }
            }
            for (i, c) in committed.iter_mut().enumerate() {
                journal.empty_if_committed(i, c);
            }
        } else if retrying > 0 {
            wait = (wait * 2).min(RETRY_MAX);
        }
        let mut left = 0;
        for job in jobs {
            match job.then {
                Then::Acknowledge(done) => {
                    let _ = done.send(result.clone());
                }
                // Answered already: again with the next commit.
                Then::Journaled(_) if result.is_err() && open && carried.len() < CARRIED_MAX => {
                    carried.push(job);
                }
                Then::Journaled(_) if result.is_err() => left += 1,
                Then::Journaled(_) => {}
            }
        }
        if left > 0 {
            tracing::warn!(
                approvals = left,
                "call records: approvals left in the journal for the next start"
            );
        }
    }
}

/// Moves jobs that are waiting into `jobs` until they hold [`CHUNK`]
/// notices.
fn take_waiting(rx: &mut mpsc::Receiver<Job>, jobs: &mut Vec<Job>, count: &mut usize) {
    while *count < CHUNK {
        match rx.try_recv() {
            Ok(job) => {
                *count += job.notices.len();
                jobs.push(job);
            }
            Err(_) => break,
        }
    }
}

const COLUMNS: &str = columns!();

fn record(r: &rusqlite::Row<'_>) -> rusqlite::Result<CallRecord> {
    Ok(CallRecord {
        call_id: r.get(0)?,
        caller: r.get(1)?,
        callee: r.get(2)?,
        flags: r.get(3)?,
        param: r.get(4)?,
        user_str: r.get(5)?,
        requested_ms: r.get(6)?,
        rang_ms: r.get(7)?,
        answered_ms: r.get(8)?,
        ended_ms: r.get(9)?,
        duration_ms: r.get(10)?,
        end_code: r.get(11)?,
        ended_by: r.get(12)?,
        room_id: r.get(13)?,
        missed: r.get(14)?,
        complete: r.get(15)?,
    })
}

/// Which records to read.
#[derive(Clone, Debug)]
pub enum Query<'a> {
    /// The most recent calls.
    Recent,
    /// Calls the user placed or received.
    User(&'a str),
    /// Calls to the user that never started.
    Missed(&'a str),
    /// One call.
    Call(&'a str),
}

/// Reads records, newest first.
pub fn query(conn: &Connection, q: Query<'_>, limit: usize) -> rusqlite::Result<Vec<CallRecord>> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let order = "ORDER BY COALESCE(requested_ms, ended_ms) DESC, call_id LIMIT";
    match q {
        Query::Recent => {
            let mut s = conn.prepare(&format!("SELECT {COLUMNS} FROM calls {order} ?1"))?;
            s.query_map(params![limit], record)?.collect()
        }
        Query::User(u) => {
            let mut s = conn.prepare(&format!(
                "SELECT {COLUMNS} FROM calls WHERE caller = ?1 OR callee = ?1 {order} ?2"
            ))?;
            s.query_map(params![u, limit], record)?.collect()
        }
        Query::Missed(u) => {
            let mut s = conn.prepare(&format!(
                "SELECT {COLUMNS} FROM calls WHERE callee = ?1 AND missed = 1 {order} ?2"
            ))?;
            s.query_map(params![u, limit], record)?.collect()
        }
        Query::Call(id) => {
            let mut s = conn.prepare(&format!("SELECT {COLUMNS} FROM calls WHERE call_id = ?1"))?;
            Ok(s.query_row(params![id], record)
                .optional()?
                .into_iter()
                .collect())
        }
    }
}

/// Writes records as CSV with a header row.
pub fn write_csv<W: std::io::Write>(out: W, records: &[CallRecord]) -> Result<(), csv::Error> {
    let mut w = csv::Writer::from_writer(out);
    w.write_record([
        "call_id",
        "caller",
        "callee",
        "flags",
        "param",
        "user_str",
        "requested_ms",
        "rang_ms",
        "answered_ms",
        "ended_ms",
        "duration_ms",
        "end_code",
        "ended_by",
        "room_id",
        "missed",
        "complete",
    ])?;
    let opt = |v: Option<String>| v.unwrap_or_default();
    for r in records {
        w.write_record([
            r.call_id.clone(),
            r.caller.clone(),
            r.callee.clone(),
            opt(r.flags.map(|v| v.to_string())),
            opt(r.param.map(|v| v.to_string())),
            opt(r.user_str.clone()),
            opt(r.requested_ms.map(|v| v.to_string())),
            opt(r.rang_ms.map(|v| v.to_string())),
            opt(r.answered_ms.map(|v| v.to_string())),
            opt(r.ended_ms.map(|v| v.to_string())),
            opt(r.duration_ms.map(|v| v.to_string())),
            opt(r.end_code.map(|v| v.to_string())),
            opt(r.ended_by.clone()),
            opt(r.room_id.map(|v| v.to_string())),
            r.missed.to_string(),
            r.complete.to_string(),
        ])?;
    }
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(
        call: &str,
        seq: u32,
        t: i32,
        code: u32,
        initiator: pb::Initiator,
    ) -> pb::CallEventNotice {
        pb::CallEventNotice {
            event_type: t,
            source_user_id: "alice".into(),
            target_user_id: "bob".into(),
            error_code: code,
            flags: 3,
            param: if t == 3 { 77 } else { 5 },
            user_str: "hi".into(),
            call_id: call.into(),
            time: Some(prost_types::Timestamp {
                seconds: 1_000 + i64::from(seq),
                nanos: 0,
            }),
            event_id: format!("{call}-{seq}"),
            sequence: seq,
            decision_required: seq == 1,
            initiator: initiator as i32,
            caller_user_id: "alice".into(),
            callee_user_id: "bob".into(),
        }
    }

    /// A notice in a transaction of its own.
    fn store(s: &mut Store, n: &pb::CallEventNotice, rang: Option<i64>) {
        s.commit([(n.clone(), rang)].iter()).unwrap();
    }

    fn store_at(path: &Path) -> Store {
        Store::new(open(path).unwrap())
    }

    /// The kinds bits of a call's row.
    fn kinds(c: &Connection, call_id: &str) -> u8 {
        c.query_row(
            "SELECT kinds FROM calls WHERE call_id = ?1",
            params![call_id],
            |r| r.get(0),
        )
        .unwrap()
    }

    fn answered_call(call: &str) -> Vec<pb::CallEventNotice> {
        vec![
            notice(call, 1, 1, 0, pb::Initiator::Caller),
            notice(call, 2, 2, 0, pb::Initiator::Callee),
            notice(call, 3, 3, 0, pb::Initiator::Service),
            notice(call, 4, 4, 0, pb::Initiator::Callee),
        ]
    }

    #[test]
    fn a_record_is_the_same_whatever_the_order_and_duplicates() {
        let dir = tempdir();
        let mut a = store_at(&dir.path().join("a.db"));
        let mut b = store_at(&dir.path().join("b.db"));
        let events = answered_call("c1");
        for n in &events {
            store(&mut a, n, None);
        }
        // Reversed, and everything twice; the second time with the row
        // read from the database, not from the writer's memory.
        for (i, n) in events.iter().rev().chain(events.iter()).enumerate() {
            if i >= events.len() {
                b.rows.clear();
            }
            store(&mut b, n, None);
        }
        let ra = query(&a.conn, Query::Call("c1"), 1).unwrap();
        let rb = query(&b.conn, Query::Call("c1"), 1).unwrap();
        assert_eq!(ra, rb);
        let r = &ra[0];
        assert!(r.complete && !r.missed);
        assert_eq!(
            (r.requested_ms, r.answered_ms, r.ended_ms, r.duration_ms),
            (
                Some(1_001_000),
                Some(1_002_000),
                Some(1_004_000),
                Some(2_000)
            )
        );
        assert_eq!(
            (r.room_id, r.end_code, r.ended_by.as_deref()),
            (Some(77), Some(0), Some("bob"))
        );
        assert_eq!(kinds(&b.conn, "c1"), 15);
        // All four in one transaction: the same record.
        let mut c = store_at(&dir.path().join("c.db"));
        let together: Vec<_> = events.iter().rev().map(|n| (n.clone(), None)).collect();
        c.commit(together.iter()).unwrap();
        assert_eq!(query(&c.conn, Query::Call("c1"), 1).unwrap(), ra);
    }

    /// Every order of an answered call's events, each twice, and every order
    /// of a missed call's, with the approval's REQUEST (and when it rang)
    /// first or last: the same record as in order.
    #[test]
    fn every_order_gives_the_same_record() {
        fn permutations(items: &[pb::CallEventNotice]) -> Vec<Vec<pb::CallEventNotice>> {
            if items.len() <= 1 {
                return vec![items.to_vec()];
            }
            let mut all = Vec::new();
            for i in 0..items.len() {
                let mut rest = items.to_vec();
                let first = rest.remove(i);
                for mut p in permutations(&rest) {
                    p.insert(0, first.clone());
                    all.push(p);
                }
            }
            all
        }
        let dir = tempdir();
        let mut c = store_at(&dir.path().join("o.db"));
        let missed = |id: &str| {
            vec![
                notice(id, 1, 1, 0, pb::Initiator::Caller),
                notice(id, 2, 2, 100_104, pb::Initiator::Callee),
            ]
        };
        for (kind, events) in [("a", answered_call("a-ref")), ("m", missed("m-ref"))] {
            for n in &events {
                let rang = (n.event_type == 1).then_some(1_001_500);
                store(&mut c, n, rang);
            }
            let mut want =
                query(&c.conn, Query::Call(&format!("{kind}-ref")), 1).unwrap()[0].clone();
            assert!(want.complete);
            for (i, order) in permutations(&events).into_iter().enumerate() {
                let id = format!("{kind}-{i}");
                let approval_last = i % 2 == 1;
                let mut order: Vec<_> = order
                    .into_iter()
                    .map(|mut n| {
                        n.call_id.clone_from(&id);
                        n.event_id = format!("{id}-{}", n.sequence);
                        n
                    })
                    .collect();
                order.extend(order.clone());
                for (k, n) in order.iter().enumerate() {
                    let approval = n.event_type == 1 && (k >= events.len()) == approval_last;
                    // Every other permutation reads the row back each time.
                    if i % 4 >= 2 {
                        c.rows.clear();
                    }
                    store(&mut c, n, approval.then_some(1_001_500));
                    let partial = query(&c.conn, Query::Call(&id), 1).unwrap()[0].clone();
                    assert_eq!(partial.complete, k + 1 >= events.len(), "{id} after {k}");
                }
                want.call_id.clone_from(&id);
                let got = query(&c.conn, Query::Call(&id), 1).unwrap()[0].clone();
                assert_eq!(got, want, "{id}");
            }
        }
    }

    /// A database of an older schema (events in a table of their own,
    /// counted in the row) keeps its records; which events each call has
    /// is carried into its row, so they are still seen as duplicates, and
    /// the rest complete it.
    #[test]
    fn an_older_database_is_migrated() {
        let dir = tempdir();
        let path = dir.path().join("v2.db");
        {
            let c = Connection::open(&path).unwrap();
            for sql in &MIGRATIONS[..2] {
                c.execute_batch(sql).unwrap();
            }
            c.pragma_update(None, "user_version", 2).unwrap();
            c.execute_batch(
                "INSERT INTO events VALUES ('old-1', 'old', 1, 1, 'alice', 'bob', 0, 3, 5, 'hi', 1, 1001000);
                 INSERT INTO events VALUES ('old-3', 'old', 3, 3, 'alice', 'bob', 0, 3, 77, 'hi', 3, 1003000);
                 INSERT INTO calls (call_id, caller, callee, requested_ms, room_id, answered_ms, events)
                 VALUES ('old', 'alice', 'bob', 1001000, 77, 1003000, 2);
                 INSERT INTO calls (call_id, caller, callee, requested_ms, events)
                 VALUES ('none', 'alice', 'bob', 1001000, 0);",
            )
            .unwrap();
        }
        let mut c = store_at(&path);
        let v: i64 = c
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v as usize, MIGRATIONS.len());
        assert_eq!(kinds(&c.conn, "old"), 1 | 4);
        assert_eq!(kinds(&c.conn, "none"), 0);
        let tables: i64 = c
            .conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'events'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(tables, 0);
        let before = query(&c.conn, Query::Call("old"), 1).unwrap();
        let events = answered_call("old");
        // The REQUEST and START stored before the migration, again: nothing
        // changes.
        store(&mut c, &events[0], None);
        store(&mut c, &events[2], None);
        assert_eq!(query(&c.conn, Query::Call("old"), 1).unwrap(), before);
        store(&mut c, &events[1], None);
        store(&mut c, &events[3], None);
        let r = &query(&c.conn, Query::Call("old"), 1).unwrap()[0];
        assert_eq!(
            (r.requested_ms, r.answered_ms, r.duration_ms, r.complete),
            (Some(1_001_000), Some(1_002_000), Some(2_000), true)
        );
    }

    /// Lookups by user find the user's calls, either side, newest first,
    /// up to the limit, with no index by user.
    #[test]
    fn a_users_calls_newest_first() {
        let dir = tempdir();
        let mut c = store_at(&dir.path().join("u.db"));
        let indexes: i64 = c
            .conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = 'calls'
                 AND name NOT LIKE 'sqlite_autoindex%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(indexes, 0);
        for i in 0..6 {
            let mut n = notice(&format!("k{i}"), 1, 1, 0, pb::Initiator::Caller);
            (n.caller_user_id, n.callee_user_id) = match i % 3 {
                0 => ("alice".into(), "bob".into()),
                1 => ("bob".into(), "alice".into()),
                _ => ("carol".into(), "dave".into()),
            };
            n.time = Some(prost_types::Timestamp {
                seconds: 1_000 + i,
                nanos: 0,
            });
            store(&mut c, &n, None);
        }
        let ids = |q| -> Vec<String> {
            query(&c.conn, q, 3)
                .unwrap()
                .into_iter()
                .map(|r| r.call_id)
                .collect()
        };
        assert_eq!(ids(Query::User("alice")), ["k4", "k3", "k1"]);
        assert_eq!(ids(Query::User("dave")), ["k5", "k2"]);
        assert_eq!(ids(Query::Recent), ["k5", "k4", "k3"]);
    }

    #[test]
    fn missed_calls_and_partial_records() {
        let dir = tempdir();
        let mut c = store_at(&dir.path().join("c.db"));
        store(
            &mut c,
            &notice("m1", 1, 1, 0, pb::Initiator::Caller),
            Some(1_001_500),
        );
        // Only the REQUEST so far: not complete.
        assert!(!query(&c.conn, Query::Call("m1"), 1).unwrap()[0].complete);
        store(
            &mut c,
            &notice("m1", 2, 2, 100_105, pb::Initiator::Service),
            None,
        );
        let r = &query(&c.conn, Query::Missed("bob"), 10).unwrap()[0];
        assert!(r.complete && r.missed);
        assert_eq!(
            (r.end_code, r.ended_by.as_deref(), r.rang_ms, r.duration_ms),
            (Some(100_105), Some("service"), Some(1_001_500), None)
        );
        assert!(
            query(&c.conn, Query::Missed("alice"), 10)
                .unwrap()
                .is_empty()
        );
        assert_eq!(query(&c.conn, Query::User("alice"), 10).unwrap().len(), 1);
        let mut csv = Vec::new();
        write_csv(&mut csv, &query(&c.conn, Query::Recent, 10).unwrap()).unwrap();
        let text = String::from_utf8(csv).unwrap();
        assert!(text.starts_with("call_id,caller,callee"));
        assert!(
            text.contains(
                "m1,alice,bob,3,5,hi,1001000,1001500,,1002000,,100105,service,,true,true"
            ),
            "{text}"
        );
    }

    #[test]
    fn reopening_keeps_records_and_schema() {
        let dir = tempdir();
        let path = dir.path().join("r.db");
        {
            let mut c = store_at(&path);
            for n in answered_call("k1") {
                store(&mut c, &n, None);
            }
        }
        let c = open(&path).unwrap();
        let v: i64 = c
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v as usize, MIGRATIONS.len());
        assert!(query(&c, Query::Call("k1"), 1).unwrap()[0].complete);
    }

    fn tempdir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    /// An approval is answered while the writer cannot commit at all (another
    /// connection holds the write lock), and is committed once it can.
    #[tokio::test]
    async fn an_approval_waits_for_no_commit() {
        let dir = tempdir();
        let db = dir.path().join("r.db");
        let records = Records::start(&db).unwrap();
        let mut blocker = open(&db).unwrap();
        let lock = blocker
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .unwrap();
        let queued = records.clone();
        let batch: Vec<pb::CallEventNotice> = (0..300)
            .flat_map(|i| answered_call(&format!("call-{i}")))
            .collect();
        let notices = tokio::spawn(async move { queued.store_all(batch).await });
        let request = notice("approved", 1, 1, 0, pb::Initiator::Caller);
        records.approval(request, Some(1_000)).await.unwrap();
        assert!(
            !notices.is_finished(),
            "the notices were committed through the lock"
        );
        assert!(std::fs::metadata(journal_path(&db)).unwrap().len() > 0);
        drop(lock);
        notices.await.unwrap().unwrap();
        // Queued after the approval: once it is in, so is the approval, and
        // the journal is empty again.
        for n in answered_call("after") {
            records.store(n).await.unwrap();
        }
        let conn = open(&db).unwrap();
        let complete: i64 = conn
            .query_row("SELECT COUNT(*) FROM calls WHERE complete = 1", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(complete, 301);
        let rang: Option<i64> = conn
            .query_row(
                "SELECT rang_ms FROM calls WHERE call_id = 'approved'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(rang, Some(1_000));
    }

    /// An approval whose commit failed goes with the next commit, and its
    /// journal segment is emptied once it is in; notices in a failed
    /// commit are refused (the call service sends them again).
    #[tokio::test]
    async fn a_failed_commit_keeps_its_approvals_for_the_next() {
        let dir = tempdir();
        let db = dir.path().join("r.db");
        let [first, second] = segment_paths(&db);
        let records = Records::start_with(&db, 1, Some(std::time::Duration::ZERO)).unwrap();
        let mut blocker = open(&db).unwrap();
        let lock = blocker
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .unwrap();
        let request = notice("approved", 1, 1, 0, pb::Initiator::Caller);
        records.approval(request, Some(9)).await.unwrap();
        // Queued behind it, so in the same failed commit.
        let refused = records.store(notice("refused", 2, 2, 0, pb::Initiator::Callee));
        assert!(matches!(refused.await, Err(RecordsError::Write(_))));
        // Appends move on; the first segment still holds the approval.
        let later = notice("later", 1, 1, 0, pb::Initiator::Caller);
        records.approval(later, Some(10)).await.unwrap();
        assert_eq!(frames(&first), ["approved"]);
        drop(lock);
        // Nothing else comes: the retry goes on its own.
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(10));
        for _ in 0..1_000 {
            if frames(&first).is_empty() {
                break;
            }
            tick.tick().await;
        }
        assert_eq!(frames(&first), Vec::<String>::new());
        records.flush().await.unwrap();
        let conn = open(&db).unwrap();
        assert_eq!(
            query(&conn, Query::Call("approved"), 1).unwrap()[0].rang_ms,
            Some(9)
        );
        assert_eq!(
            query(&conn, Query::Call("later"), 1).unwrap()[0].rang_ms,
            Some(10)
        );
        assert!(query(&conn, Query::Call("refused"), 1).unwrap().is_empty());
        // The second, left by appends, once they move on again.
        records
            .approval(notice("last", 1, 1, 0, pb::Initiator::Caller), None)
            .await
            .unwrap();
        records.flush().await.unwrap();
        assert_eq!(frames(&second), Vec::<String>::new());
    }

    /// An approval given up while it waits for room in the writer's queue
    /// leaves nothing in the journal: a frame no job counts would keep its
    /// segment from ever being emptied.
    #[tokio::test]
    async fn an_approval_given_up_for_a_full_queue_leaves_no_frame() {
        let dir = tempdir();
        let db = dir.path().join("r.db");
        let records =
            Records::start_with(&db, SEGMENT_BYTES, Some(std::time::Duration::from_secs(60)))
                .unwrap();
        let mut blocker = open(&db).unwrap();
        let lock = blocker
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .unwrap();
        // The writer holds a transaction's worth, waiting for the lock; the
        // queue behind it fills.
        let mut waiting = 0;
        loop {
            let n = notice(&format!("call-{waiting}"), 1, 1, 0, pb::Initiator::Caller);
            let approval = records.approval(n, Some(1));
            match tokio::time::timeout(std::time::Duration::from_millis(50), approval).await {
                Ok(r) => r.unwrap(),
                Err(_) => break,
            }
            waiting += 1;
            assert!(waiting <= QUEUE + CHUNK + 1, "the queue never filled");
        }
        assert_eq!(frames(&journal_path(&db)).len(), waiting);
        drop(lock);
        records.flush().await.unwrap();
        let conn = open(&db).unwrap();
        assert_eq!(query(&conn, Query::Recent, 10_000).unwrap().len(), waiting);
        assert!(
            query(&conn, Query::Call(&format!("call-{waiting}")), 1)
                .unwrap()
                .is_empty()
        );
    }

    fn frames(path: &Path) -> Vec<String> {
        let mut left = Vec::new();
        Segment::open(path.to_owned(), &mut left).unwrap();
        left.into_iter().map(|(n, _)| n.call_id).collect()
    }

    /// Appends move to the other segment once the active one is past its
    /// size and the other is empty; the writer empties a segment appenders
    /// have left once every frame in it is committed, and not before.
    #[tokio::test]
    async fn a_journal_segment_is_emptied_once_its_approvals_are_committed() {
        let dir = tempdir();
        let db = dir.path().join("r.db");
        let [first, second] = segment_paths(&db);
        // Past its size after one frame.
        let records = Records::start_with(&db, 1, None).unwrap();
        let approve = |call: &'static str| {
            let r = records.clone();
            async move {
                let n = notice(call, 1, 1, 0, pb::Initiator::Caller);
                r.approval(n, Some(1)).await.unwrap();
            }
        };
        let mut blocker = open(&db).unwrap();
        let lock = blocker
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .unwrap();
        approve("a").await;
        approve("b").await;
        approve("c").await;
        // "b" moved on to the empty second segment; "c" found the first
        // not emptied (nothing is committed) and stayed.
        assert_eq!(frames(&first), ["a"]);
        assert_eq!(frames(&second), ["b", "c"]);
        drop(lock);
        // Queued after them: once it is in, so are they.
        records
            .store(notice("x", 1, 1, 0, pb::Initiator::Caller))
            .await
            .unwrap();
        assert_eq!(frames(&first), Vec::<String>::new());
        assert_eq!(frames(&second), ["b", "c"]);
        approve("d").await;
        records
            .store(notice("y", 1, 1, 0, pb::Initiator::Caller))
            .await
            .unwrap();
        assert_eq!(frames(&first), ["d"]);
        assert_eq!(frames(&second), Vec::<String>::new());
        let conn = open(&db).unwrap();
        for call in ["a", "b", "c", "d"] {
            assert_eq!(
                query(&conn, Query::Call(call), 1).unwrap()[0].rang_ms,
                Some(1)
            );
        }
    }

    /// Approvals journaled but never committed (the process died) are
    /// stored on the next start; a torn last frame is left out.
    #[tokio::test]
    async fn the_next_start_stores_what_the_journal_holds() {
        let dir = tempdir();
        let db = dir.path().join("r.db");
        drop(open(&db).unwrap());
        let paths = segment_paths(&db);
        {
            let (journal, left) = Journal::open(paths.clone(), 1).unwrap();
            assert!(left.is_empty());
            journal.reset().unwrap();
            let mut request = notice("lost", 0, 1, 0, pb::Initiator::Caller);
            request.user_str = "hello".into();
            assert_eq!(journal.append(&request, Some(7)).unwrap(), 0);
            // In the second segment.
            let refused = notice("refused", 0, 1, 0, pb::Initiator::Caller);
            assert_eq!(journal.append(&refused, None).unwrap(), 1);
        }
        // A crash in the middle of a third append.
        let mut f = OpenOptions::new().append(true).open(&paths[1]).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2]).unwrap();
        drop(f);

        let records = Records::start(&db).unwrap();
        for path in &paths {
            assert_eq!(std::fs::metadata(path).unwrap().len(), 0);
        }
        let conn = open(&db).unwrap();
        let lost = query(&conn, Query::Call("lost"), 1).unwrap();
        assert_eq!(lost[0].user_str.as_deref(), Some("hello"));
        assert_eq!(lost[0].rang_ms, Some(7));
        let refused = query(&conn, Query::Call("refused"), 1).unwrap();
        assert_eq!(refused[0].rang_ms, None);
        // Stored once: a replay again (the REQUEST also came as a notice)
        // changes nothing.
        records
            .store(notice("lost", 0, 1, 0, pb::Initiator::Caller))
            .await
            .unwrap();
        assert_eq!(query(&conn, Query::Call("lost"), 1).unwrap(), lost);
        assert_eq!(kinds(&conn, "lost"), 1);
    }
}
