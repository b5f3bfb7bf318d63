//! Runs of the call load against started services: one rate, or a ramp that
//! finds the highest rate with zero failed calls.
//!
//! A step is clean when every offered call started on time (no pair
//! shortage), every call went as planned, and the call service dropped no
//! notice to the business service (events on means every event reaches it).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::calls::{self, LoadResult, LoadSpec, Pool, Progress};
use crate::procs::{ProcCost, Services, sample, scrape};

/// One run at one rate, with what the processes spent on it.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    #[serde(flatten)]
    pub load: LoadResult,
    /// Notices the call service dropped during the step.
    pub notices_dropped: f64,
    pub clean: bool,
    /// CPU seconds and memory of each server process over the step.
    pub processes: Vec<(String, ProcCost)>,
    /// CPU seconds per 1000 completed calls, all server processes together.
    pub server_cpu_ms_per_call: f64,
    /// CPU seconds of the load generator itself (every SDK client) over the
    /// step: on one machine it competes with the servers for the cores.
    pub generator_cpu_s: f64,
    /// On Redis: round trips to it per completed call (all nodes), and
    /// commands it ran per completed call.
    pub store_round_trips_per_call: Option<f64>,
    pub redis_commands_per_call: Option<f64>,
    /// On Redis: commits per completed call (all nodes), and a commit's
    /// mean round trip as the nodes time it (ms).
    pub commits_per_call: Option<f64>,
    pub commit_ms: Option<f64>,
}

/// How a ramp goes.
#[derive(Debug, Clone)]
pub struct RampSpec {
    pub start_rate: f64,
    pub factor: f64,
    pub max_rate: f64,
    pub step_seconds: f64,
    /// Bisection rounds between the last clean and the first failing rate.
    pub refine: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct RampResult {
    pub steps: Vec<Step>,
    /// The highest offered rate that ran clean.
    pub max_clean_rate: Option<f64>,
    /// Its completed calls per second.
    pub max_clean_completed_per_s: Option<f64>,
    /// Setup latency at half the highest clean rate, on services and devices started
    /// afresh (filled in by the caller, see [`at_rate`]): of several such
    /// runs, the one with the median REQUEST→START p99.
    pub at_half: Option<Step>,
    /// REQUEST→START p99 of each fresh run at half rate (ms), in run order:
    /// on a shared machine one run's tail moves by a factor of two.
    pub at_half_p99_ms: Vec<f64>,
    /// Half the highest clean rate right after the ramp, on the same
    /// processes: what an overload leaves behind shows here.
    pub at_half_after_ramp: Option<Step>,
}

/// Runs `spec` once and measures the services around it.
pub async fn step(
    services: &Services,
    pool: &mut Pool,
    spec: &LoadSpec,
    quiet: bool,
) -> anyhow::Result<Step> {
    let metrics = services.metrics()?;
    let dropped_before = dropped_all(services).await?;
    let trips_before = round_trips(services).await?;
    let commits_before = commits(services).await?;
    let commands_before = services.redis_commands().await?;
    let before = services.samples();
    let generator_before = sample(std::process::id()).unwrap_or_default();
    let progress = Arc::new(Progress::default());
    let printer = (!quiet).then(|| {
        let p = progress.clone();
        let rate = spec.rate;
        let total = spec.calls;
        tokio::spawn(async move {
            let t0 = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut last = 0;
            loop {
                tick.tick().await;
                let done = p.done.load(Relaxed);
                let started = p.started.load(Relaxed);
                eprintln!(
                    "[{:>5.1}s] rate {rate:.0}/s  started {started}/{total}  completed {done} (+{}/s)  failed {}  in flight {}",
                    t0.elapsed().as_secs_f64(),
                    done - last,
                    p.failed.load(Relaxed),
                    started.saturating_sub(done + p.failed.load(Relaxed)),
                );
                last = done;
            }
        })
    });
    let load = calls::run(pool, spec, &progress).await;
    if let Some(p) = printer {
        p.abort();
    }
    // Notices still queued are not lost; wait for them so the next step
    // starts from an idle service, and count drops once they are settled.
    // Their delivery is part of the step's cost.
    if let Some(metrics) = &metrics {
        let deadline = Instant::now() + Duration::from_secs(60);
        while (backlog_all(services).await? > 0.0
            || scrape(metrics, "videocall_calls").await? > 0.0)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let after = services.samples();
    let generator_after = sample(std::process::id()).unwrap_or_default();
    let notices_dropped = dropped_all(services).await? - dropped_before;
    let processes: Vec<(String, ProcCost)> = before
        .iter()
        .zip(after.iter())
        .map(|((name, b), (_, a))| (name.to_string(), ProcCost::between(*b, *a)))
        .collect();
    let cpu: f64 = processes.iter().map(|(_, c)| c.cpu_s).sum();
    let clean = load.clean() && notices_dropped == 0.0;
    let per_call = |n: f64| n / (load.completed.max(1) as f64);
    let store_round_trips_per_call = match services.redis {
        Some(_) => Some(per_call(round_trips(services).await? - trips_before)),
        None => None,
    };
    let (commits_per_call, commit_ms) = match services.redis {
        Some(_) => {
            let (n, secs) = commits(services).await?;
            let (n, secs) = (n - commits_before.0, secs - commits_before.1);
            (Some(per_call(n)), Some(secs * 1000.0 / n.max(1.0)))
        }
        None => (None, None),
    };
    let redis_commands_per_call = match (services.redis_commands().await?, commands_before) {
        (Some(a), Some(b)) => Some(per_call(a - b)),
        _ => None,
    };
    Ok(Step {
        commits_per_call,
        commit_ms,
        store_round_trips_per_call,
        redis_commands_per_call,
        server_cpu_ms_per_call: cpu * 1000.0 / (load.completed.max(1) as f64),
        load,
        notices_dropped,
        clean,
        processes,
        generator_cpu_s: generator_after.cpu_s - generator_before.cpu_s,
    })
}

/// Notices dropped so far, all nodes together.
async fn dropped_all(services: &Services) -> anyhow::Result<f64> {
    let mut n = 0.0;
    for m in services.all_metrics()? {
        n += dropped(Some(&m)).await?;
    }
    Ok(n)
}

/// Notices waiting for the business service, all nodes together.
async fn backlog_all(services: &Services) -> anyhow::Result<f64> {
    let mut n = 0.0;
    for m in services.all_metrics()? {
        n += scrape(&m, "videocall_notice_backlog").await?;
    }
    Ok(n)
}

/// Round trips to Redis so far, all nodes together.
async fn round_trips(services: &Services) -> anyhow::Result<f64> {
    let mut n = 0.0;
    for m in services.all_metrics()? {
        n += scrape(&m, "videocall_store_round_trips_total").await?;
    }
    Ok(n)
}

/// Commits to Redis so far and the seconds their round trips took, all
/// nodes together.
async fn commits(services: &Services) -> anyhow::Result<(f64, f64)> {
    let (mut n, mut secs) = (0.0, 0.0);
    for m in services.all_metrics()? {
        n += scrape(&m, "videocall_store_commit_seconds_count").await?;
        secs += scrape(&m, "videocall_store_commit_seconds_sum").await?;
    }
    Ok((n, secs))
}

/// Notices the call service dropped so far (the floor relay sends none).
async fn dropped(metrics: Option<&str>) -> anyhow::Result<f64> {
    match metrics {
        Some(m) => scrape(m, "videocall_notices_dropped_total").await,
        None => Ok(0.0),
    }
}

/// Raises the rate by `factor` until a step fails, then bisects.
pub async fn ramp(
    services: &Services,
    pool: &mut Pool,
    template: &LoadSpec,
    r: &RampSpec,
    quiet: bool,
) -> anyhow::Result<RampResult> {
    let mut steps = Vec::new();
    let mut good: Option<(f64, f64)> = None;
    let mut bad: Option<f64> = None;
    let mut rate = r.start_rate;
    while rate <= r.max_rate {
        let s = at_rate(services, pool, template, rate, r.step_seconds, quiet).await?;
        let clean = s.clean;
        let completed = s.load.completed_per_s;
        steps.push(s);
        if clean {
            good = Some((rate, completed));
            rate *= r.factor;
        } else {
            bad = Some(rate);
            break;
        }
    }
    if let (Some(_), Some(_)) = (good, bad) {
        for _ in 0..r.refine {
            let (lo, _) = good.unwrap_or_default();
            let hi = bad.unwrap_or(lo);
            let mid = ((lo + hi) / 2.0).round();
            if hi - lo < lo * 0.03 {
                break;
            }
            let s = at_rate(services, pool, template, mid, r.step_seconds, quiet).await?;
            if s.clean {
                good = Some((mid, s.load.completed_per_s));
            } else {
                bad = Some(mid);
            }
            steps.push(s);
        }
    }
    let at_half_after_ramp = match good {
        Some((rate, _)) => {
            Some(at_rate(services, pool, template, rate / 2.0, r.step_seconds, quiet).await?)
        }
        None => None,
    };
    Ok(RampResult {
        steps,
        max_clean_rate: good.map(|g| g.0),
        max_clean_completed_per_s: good.map(|g| g.1),
        at_half: None,
        at_half_p99_ms: Vec::new(),
        at_half_after_ramp,
    })
}

fn spec_at(template: &LoadSpec, rate: f64, seconds: f64) -> LoadSpec {
    LoadSpec {
        rate,
        calls: ((rate * seconds).ceil() as u64).max(1),
        ..template.clone()
    }
}

/// One step at `rate` for `seconds`, after settling.
pub async fn at_rate(
    services: &Services,
    pool: &mut Pool,
    template: &LoadSpec,
    rate: f64,
    seconds: f64,
    quiet: bool,
) -> anyhow::Result<Step> {
    settle().await;
    let s = step(services, pool, &spec_at(template, rate, seconds), quiet).await?;
    report_step(&s);
    Ok(s)
}

/// A pause between steps, so that what an overloaded step left behind (the
/// kernel's socket buffers, deferred work in every process) does not count
/// against the next one.
async fn settle() {
    tokio::time::sleep(Duration::from_secs(2)).await;
}

fn report_step(s: &Step) {
    let l = &s.load;
    eprintln!(
        "step {:>7.0}/s: {} — completed {:.0}/s, failed {}, not started {}, notices dropped {}, REQUEST→START p99 {:.2} ms",
        l.offered_rate,
        if s.clean { "clean" } else { "NOT clean" },
        l.completed_per_s,
        l.failed,
        l.not_started,
        s.notices_dropped,
        l.request_to_start.p99_ms,
    );
    for (what, n) in &l.failures {
        eprintln!("    {n} × {what}");
    }
}
