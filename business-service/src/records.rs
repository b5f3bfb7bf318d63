//! Call detail records in SQLite.
//!
//! Every notice is stored once, by its `event_id` (a redelivered or late
//! notice changes nothing), and folded into its call's record. Each event
//! type sets only its own columns, so the record comes out the same whatever
//! order the events arrive in. A record is `complete` when every event of
//! its call is in: REQUEST and a non-zero REPLY for a call that never
//! started (a *missed* call: no answer, cancelled, offline, busy, rejected,
//! refused), or REQUEST, REPLY 0, START and FINISH.
//!
//! One thread owns the connection ([`Records`] is its handle); writes are
//! batched into one transaction per wake-up and acknowledged only once
//! committed, so the hook answers a notice, and an approval, only after it is
//! written (WAL with `synchronous=NORMAL`: safe across a crash of the
//! process, no fsync per commit).
//! Readers (the operator CLI) open their own connection; WAL mode lets them
//! read while the service writes.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};
use videocall_proto::v1 as pb;

/// Jobs waiting for the writer thread; senders wait when it is full.
const QUEUE: usize = 1024;
/// The most jobs committed in one transaction.
const BATCH: usize = 256;

/// The schema, one entry per version; `PRAGMA user_version` says how many
/// have been applied. Only ever append.
const MIGRATIONS: &[&str] = &[r#"
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
"#];

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

struct Job {
    notice: pb::CallEventNotice,
    /// Set for an approved REQUEST: when the business service allowed it.
    rang_ms: Option<i64>,
    done: oneshot::Sender<Result<(), String>>,
}

/// Handle to the writer thread. Cheap to clone; the thread ends when the
/// last handle is dropped.
#[derive(Clone, Debug)]
pub struct Records {
    tx: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("event_id", &self.notice.event_id)
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

impl Records {
    /// Opens the database and starts its writer thread.
    pub fn start(path: &Path) -> Result<Self, RecordsError> {
        let conn = open(path)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("call-records".into())
            .spawn(move || writer(conn, rx))
            .map_err(RecordsError::Thread)?;
        Ok(Self { tx })
    }

    /// Stores a notice and returns once it is committed.
    pub async fn store(
        &self,
        notice: pb::CallEventNotice,
        rang_ms: Option<i64>,
    ) -> Result<(), RecordsError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Job {
                notice,
                rang_ms,
                done,
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

impl Records {
    /// Stores several notices and returns once all are committed: they are
    /// queued together, so the writer commits them in one transaction.
    pub async fn store_all(&self, notices: Vec<pb::CallEventNotice>) -> Result<(), RecordsError> {
        let mut acks = Vec::with_capacity(notices.len());
        for notice in notices {
            let (done, rx) = oneshot::channel();
            self.tx
                .send(Job {
                    notice,
                    rang_ms: None,
                    done,
                })
                .await
                .map_err(|_| RecordsError::Stopped)?;
            acks.push(rx);
        }
        for rx in acks {
            match rx.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(RecordsError::Write(e)),
                Err(_) => return Err(RecordsError::Stopped),
            }
        }
        Ok(())
    }
}

fn writer(mut conn: Connection, mut rx: mpsc::Receiver<Job>) {
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let result = (|| {
            let tx = conn.transaction()?;
            for job in &batch {
                apply(&tx, &job.notice, job.rang_ms)?;
            }
            tx.commit()
        })();
        let result = result.map_err(|e| e.to_string());
        if let Err(e) = &result {
            tracing::error!(error = %e, events = batch.len(), "call records not written");
        }
        for job in batch.drain(..) {
            let _ = job.done.send(result.clone());
        }
    }
}

fn millis(t: &Option<prost_types::Timestamp>) -> i64 {
    t.as_ref()
        .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
        .unwrap_or(0)
}

fn ended_by(n: &pb::CallEventNotice) -> String {
    match pb::Initiator::try_from(n.initiator) {
        Ok(pb::Initiator::Caller) => n.caller_user_id.clone(),
        Ok(pb::Initiator::Callee) => n.callee_user_id.clone(),
        Ok(pb::Initiator::Business) => "business".into(),
        _ => "service".into(),
    }
}

/// Stores one notice and folds it into its call's record. Idempotent.
fn apply(
    tx: &rusqlite::Transaction<'_>,
    n: &pb::CallEventNotice,
    rang_ms: Option<i64>,
) -> rusqlite::Result<()> {
    let t = millis(&n.time);
    let fresh = tx.execute(
        "INSERT OR IGNORE INTO events VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        params![
            n.event_id,
            n.call_id,
            n.sequence,
            n.event_type,
            n.source_user_id,
            n.target_user_id,
            n.error_code,
            n.flags,
            n.param,
            n.user_str,
            n.initiator,
            t
        ],
    )?;
    if let Some(r) = rang_ms {
        tx.execute(
            "INSERT INTO calls (call_id, caller, callee, rang_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (call_id) DO UPDATE SET rang_ms = COALESCE(rang_ms, excluded.rang_ms)",
            params![n.call_id, n.caller_user_id, n.callee_user_id, r],
        )?;
    }
    if fresh == 0 {
        return Ok(());
    }
    tx.execute(
        "INSERT INTO calls (call_id, caller, callee) VALUES (?1, ?2, ?3) ON CONFLICT (call_id) DO NOTHING",
        params![n.call_id, n.caller_user_id, n.callee_user_id],
    )?;
    let id = &n.call_id;
    match pb::EventType::try_from(n.event_type) {
        Ok(pb::EventType::Request) => tx.execute(
            "UPDATE calls SET flags = ?2, param = ?3, user_str = ?4, requested_ms = ?5 WHERE call_id = ?1",
            params![id, n.flags, n.param, n.user_str, t],
        )?,
        Ok(pb::EventType::Reply) if n.error_code == 0 => {
            tx.execute("UPDATE calls SET answered_ms = ?2 WHERE call_id = ?1", params![id, t])?
        }
        Ok(pb::EventType::Reply) => tx.execute(
            "UPDATE calls SET ended_ms = ?2, end_code = ?3, ended_by = ?4, missed = 1 WHERE call_id = ?1",
            params![id, t, n.error_code, ended_by(n)],
        )?,
        Ok(pb::EventType::Start) => tx.execute(
            "UPDATE calls SET room_id = ?2, answered_ms = COALESCE(answered_ms, ?3) WHERE call_id = ?1",
            params![id, n.param, t],
        )?,
        Ok(pb::EventType::Finish) => tx.execute(
            "UPDATE calls SET ended_ms = ?2, end_code = ?3, ended_by = ?4 WHERE call_id = ?1",
            params![id, t, n.error_code, ended_by(n)],
        )?,
        _ => 0,
    };
    tx.execute(
        "UPDATE calls SET
            duration_ms = CASE WHEN missed = 0 AND answered_ms IS NOT NULL AND ended_ms IS NOT NULL
                               THEN ended_ms - answered_ms END,
            complete = (SELECT COUNT(*) FROM events e WHERE e.call_id = calls.call_id)
                       = CASE WHEN missed = 1 THEN 2 ELSE 4 END
         WHERE call_id = ?1",
        params![id],
    )?;
    Ok(())
}

const COLUMNS: &str =
    "call_id, caller, callee, flags, param, user_str, requested_ms, rang_ms, answered_ms,
    ended_ms, duration_ms, end_code, ended_by, room_id, missed, complete";

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

    fn store(conn: &mut Connection, n: &pb::CallEventNotice, rang: Option<i64>) {
        let tx = conn.transaction().unwrap();
        apply(&tx, n, rang).unwrap();
        tx.commit().unwrap();
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
        let mut a = open(&dir.path().join("a.db")).unwrap();
        let mut b = open(&dir.path().join("b.db")).unwrap();
        let events = answered_call("c1");
        for n in &events {
            store(&mut a, n, None);
        }
        // Reversed, and everything twice.
        for n in events.iter().rev().chain(events.iter()) {
            store(&mut b, n, None);
        }
        let ra = query(&a, Query::Call("c1"), 1).unwrap();
        let rb = query(&b, Query::Call("c1"), 1).unwrap();
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
        let events_stored: i64 = b
            .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
            .unwrap();
        assert_eq!(events_stored, 4);
    }

    #[test]
    fn missed_calls_and_partial_records() {
        let dir = tempdir();
        let mut c = open(&dir.path().join("c.db")).unwrap();
        store(
            &mut c,
            &notice("m1", 1, 1, 0, pb::Initiator::Caller),
            Some(1_001_500),
        );
        // Only the REQUEST so far: not complete.
        assert!(!query(&c, Query::Call("m1"), 1).unwrap()[0].complete);
        store(
            &mut c,
            &notice("m1", 2, 2, 100_105, pb::Initiator::Service),
            None,
        );
        let r = &query(&c, Query::Missed("bob"), 10).unwrap()[0];
        assert!(r.complete && r.missed);
        assert_eq!(
            (r.end_code, r.ended_by.as_deref(), r.rang_ms, r.duration_ms),
            (Some(100_105), Some("service"), Some(1_001_500), None)
        );
        assert!(query(&c, Query::Missed("alice"), 10).unwrap().is_empty());
        assert_eq!(query(&c, Query::User("alice"), 10).unwrap().len(), 1);
        let mut csv = Vec::new();
        write_csv(&mut csv, &query(&c, Query::Recent, 10).unwrap()).unwrap();
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
            let mut c = open(&path).unwrap();
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
}
