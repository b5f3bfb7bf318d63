//! Markdown summaries of runs, for people; JSON is the machine format.

use std::fmt::Write;

use crate::conns::ConnResult;
use crate::echo::EchoResult;
use crate::ramp::{RampResult, Step};
use crate::stats::Percentiles;

fn row(p: &Percentiles) -> String {
    format!(
        "{:.3} | {:.3} | {:.3} | {:.3} | {:.3}",
        p.p50_ms, p.p90_ms, p.p99_ms, p.p999_ms, p.max_ms
    )
}

/// One run: throughput, outcomes, failures, latencies, process costs.
pub fn step(s: &Step) -> String {
    let l = &s.load;
    let mut m = String::new();
    let _ = writeln!(
        m,
        "Offered {:.0} calls/s, {} calls: **{}** — completed {} ({:.0}/s; answered {}, rejected {}, cancelled {}, timed out {}), failed {}, not started (concurrency limit) {}, notices dropped {}, worst start lag {:.1} ms.\n",
        l.offered_rate,
        l.offered,
        if s.clean { "clean" } else { "not clean" },
        l.completed,
        l.completed_per_s,
        l.answered,
        l.rejected,
        l.cancelled,
        l.timed_out,
        l.failed,
        l.not_started,
        s.notices_dropped,
        l.max_start_lag_ms,
    );
    if !l.failures.is_empty() {
        let _ = writeln!(m, "| failure | calls |\n|---|---:|");
        for (what, n) in &l.failures {
            let _ = writeln!(m, "| {what} | {n} |");
        }
        m.push('\n');
    }
    let _ = writeln!(
        m,
        "| latency (ms) | p50 | p90 | p99 | p99.9 | max |\n|---|---:|---:|---:|---:|---:|"
    );
    let _ = writeln!(m, "| REQUEST→REPLY | {} |", row(&l.request_to_reply));
    let _ = writeln!(m, "| REQUEST→START | {} |", row(&l.request_to_start));
    let _ = writeln!(m, "| REQUEST→callee rings | {} |", row(&l.request_to_ring));
    let _ = writeln!(
        m,
        "| FINISH→both FINISHed | {} |",
        row(&l.finish_to_finished)
    );
    let _ = writeln!(
        m,
        "\n| process | CPU s | RSS MiB | peak RSS MiB |\n|---|---:|---:|---:|"
    );
    for (name, c) in &s.processes {
        let _ = writeln!(
            m,
            "| {name} | {:.2} | {:.1} | {:.1} |",
            c.cpu_s,
            c.rss_kib as f64 / 1024.0,
            c.peak_rss_kib as f64 / 1024.0
        );
    }
    let _ = writeln!(m, "| (load generator) | {:.2} | | |", s.generator_cpu_s);
    let _ = writeln!(
        m,
        "\nServer CPU per call (all server processes): {:.3} ms.",
        s.server_cpu_ms_per_call
    );
    if let (Some(t), Some(c)) = (s.store_round_trips_per_call, s.redis_commands_per_call) {
        let redis_cpu = s
            .processes
            .iter()
            .filter(|(n, _)| n == "redis-server")
            .map(|(_, p)| p.cpu_s)
            .sum::<f64>();
        let _ = writeln!(
            m,
            "Redis per completed call: {t:.1} round trips (all nodes, readers included), {c:.1} commands (scripts' own included), {:.3} ms CPU.",
            redis_cpu * 1000.0 / (l.completed.max(1) as f64)
        );
    }
    if let (Some(n), Some(ms)) = (s.commits_per_call, s.commit_ms) {
        let _ = writeln!(
            m,
            "Commits per completed call: {n:.1}, each {ms:.3} ms on average from the script sent to its reply in (`videocall_store_commit_seconds`)."
        );
    }
    m
}

pub fn ramp(r: &RampResult) -> String {
    let mut m = String::new();
    let _ = writeln!(
        m,
        "| offered/s | completed/s | clean | failed | not started | notices dropped | REQUEST→START p50 | p99 | p99.9 | server CPU ms/call | generator CPU s |\n|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for s in &r.steps {
        let l = &s.load;
        let _ = writeln!(
            m,
            "| {:.0} | {:.0} | {} | {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} |",
            l.offered_rate,
            l.completed_per_s,
            if s.clean { "yes" } else { "no" },
            l.failed,
            l.not_started,
            s.notices_dropped,
            l.request_to_start.p50_ms,
            l.request_to_start.p99_ms,
            l.request_to_start.p999_ms,
            s.server_cpu_ms_per_call,
            s.generator_cpu_s,
        );
    }
    match (r.max_clean_rate, r.max_clean_completed_per_s) {
        (Some(rate), Some(done)) => {
            let _ = writeln!(
                m,
                "\nHighest clean rate: **{rate:.0} calls/s offered** ({done:.0} completed/s)."
            );
        }
        _ => {
            let _ = writeln!(m, "\nNo step ran clean.");
        }
    }
    if let Some(h) = &r.at_half {
        let runs: Vec<String> = r.at_half_p99_ms.iter().map(|p| format!("{p:.3}")).collect();
        let _ = writeln!(
            m,
            "\n### At half that rate (services started afresh; REQUEST→START p99 of each run: {} ms; the median run)\n\n{}",
            runs.join(", "),
            step(h)
        );
    }
    if let Some(h) = &r.at_half_after_ramp {
        let _ = writeln!(
            m,
            "\n### At half that rate, right after the ramp (same processes)\n\n{}",
            step(h)
        );
    }
    m
}

pub fn conns(c: &ConnResult) -> String {
    let mut m = String::new();
    let _ = writeln!(m, "| figure | value |\n|---|---:|");
    let _ = writeln!(
        m,
        "| clients asked / connected / failed | {} / {} / {} |",
        c.clients, c.connected, c.failed
    );
    let _ = writeln!(m, "| source addresses | {} |", c.sources);
    if c.nodes > 1 {
        let _ = writeln!(
            m,
            "| call-service nodes | {} (clients spread over them in turn; memory is theirs together) |",
            c.nodes
        );
    }
    let _ = writeln!(
        m,
        "| HTTP/2 connections | {} |",
        if c.shared_connections == 0 {
            "one per client".to_owned()
        } else {
            format!("{} shared by all clients", c.shared_connections)
        }
    );
    let _ = writeln!(
        m,
        "| time to connect all | {:.1} s ({:.0}/s) |",
        c.connect_s, c.connects_per_s
    );
    let _ = writeln!(
        m,
        "| devices the service reports | {:.0} |",
        c.server_reports_connected
    );
    let _ = writeln!(
        m,
        "| call-service RSS before / connected | {:.1} MiB / {:.1} MiB |",
        c.server_rss_before_kib as f64 / 1024.0,
        c.server_rss_connected_kib as f64 / 1024.0
    );
    let _ = writeln!(
        m,
        "| **server memory per idle client** | **{:.2} KiB** |",
        c.server_kib_per_client
    );
    if let Some(b) = c.redis_bytes_per_client {
        let _ = writeln!(
            m,
            "| Redis memory per idle client (`used_memory`) | {b:.0} bytes |"
        );
    }
    let _ = writeln!(m, "| calls in talking state | {} |", c.active_calls);
    let _ = writeln!(
        m,
        "| server memory per active call | {:.2} KiB |",
        c.server_kib_per_call
    );
    let _ = writeln!(
        m,
        "| load generator memory per client | {:.2} KiB |",
        c.generator_kib_per_client
    );
    for e in &c.first_errors {
        let _ = writeln!(m, "\nerror: {e}");
    }
    m
}

pub fn echo(rs: &[EchoResult]) -> String {
    let mut m = String::new();
    let _ = writeln!(
        m,
        "| kind | connections | in flight | round trips/s | p50 ms | p99 ms | errors |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    for r in rs {
        let _ = writeln!(
            m,
            "| {} | {} | {} | {:.0} | {:.3} | {:.3} | {} |",
            r.kind,
            r.connections,
            r.concurrency,
            r.per_s,
            r.latency.p50_ms,
            r.latency.p99_ms,
            r.errors
        );
    }
    m
}
