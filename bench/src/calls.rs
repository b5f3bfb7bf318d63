//! The call load generator: real SDK clients placing full calls, open loop.
//!
//! Like SIPp's UAC: calls are *started* on a schedule (the target rate),
//! whatever happened to earlier ones; a concurrency limit caps the calls in
//! progress. Each call uses one caller/callee pair of connected devices from
//! a pool, so the pool size is the concurrency limit. A call that cannot
//! start because every pair is busy is counted as `not started (limit)`.
//!
//! Each call follows a plan chosen by its index (answered, rejected,
//! cancelled, or left to time out), and every event both sides receive is
//! checked against the contract; anything else is a failure, counted by
//! what went wrong (`REPLY 100201`, `timeout waiting for START`, ...).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use client_sdk::{Client, Code, Credentials, EventKind, Events};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use crate::stats::{Latency, Percentiles};

/// What the calls do.
#[derive(Debug, Clone, Serialize)]
pub struct CallPlan {
    /// How long the callee rings before it answers (or rejects).
    pub answer_delay: Duration,
    /// How long an answered call lasts.
    pub hold: Duration,
    /// Shares of calls the callee rejects, the caller cancels while ringing,
    /// and nobody answers until the service's ring timeout; the rest are
    /// answered.
    pub reject: f64,
    pub cancel: f64,
    pub timeout: f64,
    /// The call service's ring timeout (what an unanswered call lasts).
    pub ring_timeout: Duration,
}

/// One run at one offered rate.
#[derive(Debug, Clone, Serialize)]
pub struct LoadSpec {
    /// Calls started per second.
    pub rate: f64,
    /// Calls to start.
    pub calls: u64,
    pub plan: CallPlan,
    /// The longest wait for any one event before the call counts as failed.
    pub patience: Duration,
}

/// A caller and a callee, each one connected device.
struct Pair {
    caller: Client,
    caller_events: Events,
    callee: Client,
    callee_events: Events,
}

impl Pair {
    async fn caller_gets(
        &mut self,
        kind: EventKind,
        code: Code,
        patience: Duration,
    ) -> Result<Instant, String> {
        expect(&mut self.caller_events, "caller", kind, code, patience).await
    }

    async fn callee_gets(
        &mut self,
        kind: EventKind,
        code: Code,
        patience: Duration,
    ) -> Result<Instant, String> {
        expect(&mut self.callee_events, "callee", kind, code, patience).await
    }
}

/// The connected devices calls are placed between.
pub struct Pool {
    free_tx: mpsc::Sender<Pair>,
    free_rx: mpsc::Receiver<Pair>,
    pub size: usize,
    pub connect_time: Duration,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("size", &self.size).finish()
    }
}

impl Pool {
    /// Connects `pairs` caller/callee pairs to the call service at `url`.
    /// With `shared` 0 each device has its own HTTP/2 connection, as
    /// terminals on their own; otherwise the devices' streams share `shared`
    /// connections, as behind an HTTP/2 proxy (and as SIPp sends every call
    /// over one socket).
    /// With several `urls` (the nodes of a cluster), pair `i`'s caller
    /// connects to node `i` and its callee to the next one.
    pub async fn connect(
        urls: &[String],
        pairs: usize,
        shared: usize,
        tag: &str,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(!urls.is_empty(), "no call service to connect to");
        anyhow::ensure!(
            shared == 0 || urls.len() == 1,
            "shared connections with one node only"
        );
        let url = &urls[0];
        let started = Instant::now();
        let (free_tx, free_rx) = mpsc::channel(pairs.max(1));
        let mut set = JoinSet::new();
        let gate = Arc::new(tokio::sync::Semaphore::new(256));
        let mut channels = Vec::with_capacity(shared);
        for _ in 0..shared {
            channels.push(
                tonic::transport::Endpoint::from_shared(url.to_owned())?
                    .tcp_nodelay(true)
                    .connect()
                    .await?,
            );
        }
        for i in 0..pairs {
            let url = urls[i % urls.len()].clone();
            let callee_url = urls[(i + 1) % urls.len()].clone();
            let tag = tag.to_owned();
            let gate = gate.clone();
            let channels = (!channels.is_empty()).then(|| {
                (
                    channels[(2 * i) % channels.len()].clone(),
                    channels[(2 * i + 1) % channels.len()].clone(),
                )
            });
            set.spawn(async move {
                let _permit = gate.acquire_owned().await?;
                let caller_id = Credentials::dev_user(format!("{tag}c{i}"));
                let callee_id = Credentials::dev_user(format!("{tag}e{i}"));
                let ((caller, caller_events), (callee, callee_events)) = match channels {
                    Some((a, b)) => (
                        Client::connect_with_channel(a, caller_id).await?,
                        Client::connect_with_channel(b, callee_id).await?,
                    ),
                    None => (
                        Client::connect(url.clone(), caller_id).await?,
                        Client::connect(callee_url, callee_id).await?,
                    ),
                };
                anyhow::Ok(Pair {
                    caller,
                    caller_events,
                    callee,
                    callee_events,
                })
            });
        }
        while let Some(pair) = set.join_next().await {
            let pair = pair?.context("connecting the load generator's devices")?;
            free_tx.try_send(pair).ok().context("pool full")?;
        }
        Ok(Self {
            free_tx,
            free_rx,
            size: pairs,
            connect_time: started.elapsed(),
        })
    }
}

/// What one run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadResult {
    pub offered_rate: f64,
    pub offered: u64,
    pub started: u64,
    /// Calls that went as planned, by plan.
    pub completed: u64,
    pub answered: u64,
    pub rejected: u64,
    pub cancelled: u64,
    pub timed_out: u64,
    pub failed: u64,
    /// Failures by what went wrong.
    pub failures: BTreeMap<String, u64>,
    /// Calls not started because every pair was busy.
    pub not_started: u64,
    /// From the first scheduled start to the last call's end.
    pub elapsed_s: f64,
    /// The longest `elapsed_s` a clean run may take.
    pub allowed_s: f64,
    /// Completed calls per second over `elapsed_s`.
    pub completed_per_s: f64,
    /// How far behind schedule the generator started calls, at worst.
    pub max_start_lag_ms: f64,
    /// Caller's REQUEST until the caller's REPLY, less the answer delay.
    pub request_to_reply: Percentiles,
    /// Caller's REQUEST until both have START, less the answer delay.
    pub request_to_start: Percentiles,
    /// Caller's REQUEST until the callee rings (approval included).
    pub request_to_ring: Percentiles,
    /// A party's FINISH until both have their FINISH.
    pub finish_to_finished: Percentiles,
    /// Calls completed in each second of the run.
    pub per_second: Vec<u64>,
}

impl LoadResult {
    /// Every call went as planned, and the last one ended on time: within
    /// 5% + 0.5 s of the schedule, plus what a call itself lasts (as for
    /// SIPp in `bench/sip`).
    pub fn clean(&self) -> bool {
        self.failed == 0
            && self.not_started == 0
            && self.started == self.offered
            && self.elapsed_s <= self.allowed_s
    }
}

#[derive(Default)]
struct Recorder {
    answered: u64,
    rejected: u64,
    cancelled: u64,
    timed_out: u64,
    failures: BTreeMap<String, u64>,
    to_reply: Latency,
    to_start: Latency,
    to_ring: Latency,
    to_finished: Latency,
    per_second: Vec<u64>,
}

impl Recorder {
    /// One call's result, ended in second `second` of the run.
    fn record(&mut self, outcome: Outcome, result: Result<Timings, String>, second: usize) {
        let t = match result {
            Ok(t) => t,
            Err(what) => {
                *self.failures.entry(what).or_default() += 1;
                return;
            }
        };
        match outcome {
            Outcome::Answered => self.answered += 1,
            Outcome::Rejected => self.rejected += 1,
            Outcome::Cancelled => self.cancelled += 1,
            Outcome::TimedOut => self.timed_out += 1,
        }
        if self.per_second.len() <= second {
            self.per_second.resize(second + 1, 0);
        }
        self.per_second[second] += 1;
        for (latency, d) in [
            (&mut self.to_ring, t.to_ring),
            (&mut self.to_reply, t.to_reply),
            (&mut self.to_start, t.to_start),
            (&mut self.to_finished, t.to_finished),
        ] {
            if let Some(d) = d {
                latency.record(d);
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Answered,
    Rejected,
    Cancelled,
    TimedOut,
}

/// Timings of one successful call.
#[derive(Default)]
struct Timings {
    to_ring: Option<Duration>,
    to_reply: Option<Duration>,
    to_start: Option<Duration>,
    to_finished: Option<Duration>,
}

/// The plan of call `i`: a fixed pseudo-random draw, so a run is repeatable.
fn outcome_of(i: u64, plan: &CallPlan) -> Outcome {
    // splitmix64
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let u = (z >> 11) as f64 / (1u64 << 53) as f64;
    if u < plan.reject {
        Outcome::Rejected
    } else if u < plan.reject + plan.cancel {
        Outcome::Cancelled
    } else if u < plan.reject + plan.cancel + plan.timeout {
        Outcome::TimedOut
    } else {
        Outcome::Answered
    }
}

/// Live figures, shared with the progress printer.
#[derive(Debug, Default)]
pub struct Progress {
    pub started: std::sync::atomic::AtomicU64,
    pub done: std::sync::atomic::AtomicU64,
    pub failed: std::sync::atomic::AtomicU64,
}

/// Runs `spec` on `pool`. Pairs whose call failed are not reused (their
/// state is unknown), so a failing run shrinks the pool.
pub async fn run(pool: &mut Pool, spec: &LoadSpec, progress: &Arc<Progress>) -> LoadResult {
    use std::sync::atomic::Ordering::Relaxed;
    let rec = Arc::new(Mutex::new(Recorder::default()));
    let mut tasks = JoinSet::new();
    let start = Instant::now();
    let mut started = 0u64;
    let mut not_started = 0u64;
    let mut max_lag = Duration::ZERO;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let gap = Duration::from_secs_f64(1.0 / spec.rate.max(1e-3));
    while started < spec.calls {
        tick.tick().await;
        let now = Instant::now();
        let due = (((now - start).as_secs_f64() * spec.rate) as u64 + 1).min(spec.calls);
        while started < due {
            let scheduled = start + gap.mul_f64(started as f64);
            max_lag = max_lag.max(now.saturating_duration_since(scheduled));
            match pool.free_rx.try_recv() {
                Ok(pair) => {
                    let outcome = outcome_of(started, &spec.plan);
                    let plan = spec.plan.clone();
                    let patience = spec.patience;
                    let rec = rec.clone();
                    let free = pool.free_tx.clone();
                    let progress = progress.clone();
                    progress.started.fetch_add(1, Relaxed);
                    tasks.spawn(async move {
                        let mut pair = pair;
                        let result = call(&mut pair, outcome, &plan, patience).await;
                        let second = start.elapsed().as_secs() as usize;
                        let ok = result.is_ok();
                        rec.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .record(outcome, result, second);
                        if ok {
                            progress.done.fetch_add(1, Relaxed);
                            let _ = free.try_send(pair);
                        } else {
                            progress.failed.fetch_add(1, Relaxed);
                        }
                    });
                }
                Err(_) => not_started += 1,
            }
            started += 1;
        }
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed().as_secs_f64();
    let r = Arc::try_unwrap(rec)
        .ok()
        .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
        .unwrap_or_default();
    let completed = r.answered + r.rejected + r.cancelled + r.timed_out;
    let failed = r.failures.values().sum();
    LoadResult {
        offered_rate: spec.rate,
        offered: spec.calls,
        started: started - not_started,
        completed,
        answered: r.answered,
        rejected: r.rejected,
        cancelled: r.cancelled,
        timed_out: r.timed_out,
        failed,
        failures: r.failures,
        not_started,
        elapsed_s: elapsed,
        allowed_s: spec.calls as f64 / spec.rate * 1.05
            + 0.5
            + call_length(&spec.plan).as_secs_f64(),
        completed_per_s: completed as f64 / elapsed.max(1e-9),
        max_start_lag_ms: max_lag.as_secs_f64() * 1000.0,
        request_to_reply: r.to_reply.summary(),
        request_to_start: r.to_start.summary(),
        request_to_ring: r.to_ring.summary(),
        finish_to_finished: r.to_finished.summary(),
        per_second: r.per_second,
    }
}

/// The longest a call itself lasts under `plan`, on top of its set-up.
fn call_length(plan: &CallPlan) -> Duration {
    let ring = match plan.timeout > 0.0 {
        true => plan.ring_timeout,
        false => Duration::ZERO,
    };
    (plan.answer_delay + plan.hold).max(ring)
}

/// Waits for the next event of `events` and checks it is `kind` with `code`.
async fn expect(
    events: &mut Events,
    who: &str,
    kind: EventKind,
    code: Code,
    patience: Duration,
) -> Result<Instant, String> {
    match tokio::time::timeout(patience, events.next()).await {
        Err(_) => Err(format!("{who}: timeout waiting for {kind:?}")),
        Ok(None) => Err(format!("{who}: stream ended")),
        Ok(Some(e)) if e.kind == kind && e.code == code => Ok(Instant::now()),
        Ok(Some(e)) => Err(format!(
            "{who}: {:?} {} (expected {kind:?} {})",
            e.kind, e.code.0, code.0
        )),
    }
}

fn control(who: &str, what: &str, r: Result<Code, client_sdk::Error>) -> Result<(), String> {
    match r {
        Ok(c) if c.is_ok() => Ok(()),
        Ok(c) => Err(format!("{who} {what}: result {}", c.0)),
        Err(e) => Err(format!("{who} {what}: {e}")),
    }
}

/// Sleeps, unless there is nothing to wait: a zero sleep still waits for
/// the timer's next tick (up to 1 ms).
async fn pause(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

/// One call from REQUEST to both FINISHed, checked event by event.
async fn call(
    p: &mut Pair,
    outcome: Outcome,
    plan: &CallPlan,
    patience: Duration,
) -> Result<Timings, String> {
    let caller_id = p.caller.user_id().to_owned();
    let callee_id = p.callee.user_id().to_owned();
    let mut t = Timings::default();
    let t0 = Instant::now();
    control(
        "caller",
        "REQUEST",
        p.caller.request(&callee_id, 3, 0, "").await,
    )?;
    // A call the business service refused shows up here as the caller's
    // REPLY instead of the callee's REQUEST.
    let rang = tokio::select! {
        r = expect(&mut p.callee_events, "callee", EventKind::Request, Code::OK, patience) => r?,
        e = p.caller_events.next() => return Err(match e {
            Some(e) => format!("caller: {:?} {} before ringing", e.kind, e.code.0),
            None => "caller: stream ended".into(),
        }),
    };
    t.to_ring = Some(rang - t0);
    match outcome {
        Outcome::TimedOut => {
            let patience = patience + Duration::from_secs(60);
            p.caller_gets(EventKind::Reply, Code::NO_ANSWER, patience)
                .await?;
            p.callee_gets(EventKind::Finish, Code::NO_ANSWER, patience)
                .await?;
            return Ok(t);
        }
        Outcome::Cancelled => {
            pause(plan.answer_delay).await;
            control("caller", "FINISH", p.caller.finish(&callee_id).await)?;
            p.caller_gets(EventKind::Reply, Code::CANCELLED, patience)
                .await?;
            p.callee_gets(EventKind::Finish, Code::CANCELLED, patience)
                .await?;
            return Ok(t);
        }
        Outcome::Rejected | Outcome::Answered => {}
    }
    pause(plan.answer_delay).await;
    let answered = Instant::now();
    let ringing = answered - rang;
    if outcome == Outcome::Rejected {
        control(
            "callee",
            "REPLY",
            p.callee.reply(&caller_id, Code::REJECTED).await,
        )?;
        let r = p
            .caller_gets(EventKind::Reply, Code::REJECTED, patience)
            .await?;
        t.to_reply = Some((r - t0).saturating_sub(ringing));
        p.callee_gets(EventKind::Finish, Code::REJECTED, patience)
            .await?;
        return Ok(t);
    }
    control(
        "callee",
        "REPLY",
        p.callee.reply(&caller_id, Code::OK).await,
    )?;
    let r = p.caller_gets(EventKind::Reply, Code::OK, patience).await?;
    t.to_reply = Some((r - t0).saturating_sub(ringing));
    let s1 = p.caller_gets(EventKind::Start, Code::OK, patience).await?;
    let s2 = p.callee_gets(EventKind::Start, Code::OK, patience).await?;
    t.to_start = Some((s1.max(s2) - t0).saturating_sub(ringing));
    pause(plan.hold).await;
    let hang_up = Instant::now();
    control("caller", "FINISH", p.caller.finish(&callee_id).await)?;
    let f1 = p.caller_gets(EventKind::Finish, Code::OK, patience).await?;
    let f2 = p.callee_gets(EventKind::Finish, Code::OK, patience).await?;
    t.to_finished = Some(f1.max(f2) - hang_up);
    Ok(t)
}
