//! A long run at one rate, as production runs (records on): the services'
//! memory and CPU sampled over time, and at the end the call records
//! counted against the calls placed.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::calls::{LoadSpec, Pool};
use crate::procs::{Services, sample};
use crate::ramp::{self, Step};

/// One process at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the run started.
    pub t_s: f64,
    pub process: String,
    pub rss_kib: u64,
    pub cpu_s: f64,
}

/// What the records database holds at the end.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RecordCount {
    pub calls: u64,
    pub complete: u64,
}

#[derive(Debug, Serialize)]
pub struct Soak {
    pub step: Step,
    pub samples: Vec<Sample>,
    /// `None` without records.
    pub records: Option<RecordCount>,
    /// Every call started finished as planned (none failed), has a record,
    /// and every record is complete. (Calls the generator could not start
    /// for its concurrency limit never existed; the step's `clean` says
    /// whether the rate was kept.)
    pub every_record_complete: bool,
}

/// Runs `spec` on `services`, sampling every `every`.
pub async fn soak(
    services: &Services,
    pool: &mut Pool,
    spec: &LoadSpec,
    every: Duration,
    quiet: bool,
) -> anyhow::Result<Soak> {
    let pids = services.pids();
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    // Owned here, ended below: it stops when the run does.
    let sampler = tokio::spawn(async move {
        let t0 = Instant::now();
        let mut out = Vec::new();
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopped.changed() => break,
            }
            let t_s = t0.elapsed().as_secs_f64();
            for (name, pid) in &pids {
                if let Some(s) = sample(*pid) {
                    out.push(Sample {
                        t_s,
                        process: (*name).to_owned(),
                        rss_kib: s.rss_kib,
                        cpu_s: s.cpu_s,
                    });
                }
            }
        }
        out
    });
    // The step waits for the notices to be delivered before it returns.
    let step = ramp::step(services, pool, spec, quiet).await;
    let _ = stop.send(true);
    let samples = sampler.await?;
    let step = step?;
    let records = services.records_db().map(count).transpose()?;
    let every_record_complete = step.load.failed == 0
        && records.is_some_and(|r| r.calls == step.load.completed && r.complete == r.calls);
    Ok(Soak {
        step,
        samples,
        records,
        every_record_complete,
    })
}

fn count(db: &Path) -> anyhow::Result<RecordCount> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let (calls, complete): (i64, i64) = conn.query_row(
        "SELECT COUNT(*), COALESCE(SUM(complete), 0) FROM calls",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok(RecordCount {
        calls: u64::try_from(calls).unwrap_or(0),
        complete: u64::try_from(complete).unwrap_or(0),
    })
}

/// The markdown summary: the step, the records, and memory over time.
pub fn markdown(s: &Soak) -> String {
    use std::fmt::Write;
    let mut m = crate::report::step(&s.step);
    match s.records {
        Some(r) => {
            let _ = writeln!(
                m,
                "\nCall records: {} for {} completed calls, {} complete: **{}**.\n",
                r.calls,
                s.step.load.completed,
                r.complete,
                if s.every_record_complete {
                    "every call has a complete record"
                } else {
                    "NOT every call has a complete record"
                }
            );
        }
        None => m.push_str("\nNo call records (--no-records).\n"),
    }
    m.push_str("\n| t (s) | process | RSS (MiB) | CPU (s) |\n|---:|---|---:|---:|\n");
    for x in &s.samples {
        let _ = writeln!(
            m,
            "| {:.0} | {} | {:.1} | {:.1} |",
            x.t_s,
            x.process,
            x.rss_kib as f64 / 1024.0,
            x.cpu_s
        );
    }
    m
}
