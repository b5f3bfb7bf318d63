//! `videocall-bench`: load generator and benchmarks. Parses the command
//! line, starts the services as child processes, runs one mode, prints a
//! summary and writes JSON / markdown.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use tokio::net::TcpListener;
use videocall_bench::calls::{CallPlan, LoadSpec, Pool};
use videocall_bench::procs::{ServiceOptions, Services, sibling};
use videocall_bench::{conns, echo, floor, ramp, report};

#[derive(Debug, Parser)]
#[command(
    name = "videocall-bench",
    version,
    about = "Load generator and benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Full calls at one rate (open loop), against services it starts.
    Calls {
        #[command(flatten)]
        common: Common,
        /// Calls started per second.
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        /// Calls to start.
        #[arg(long, default_value_t = 5000)]
        calls: u64,
        /// Exit with status 1 unless every call went as planned.
        #[arg(long)]
        require_clean: bool,
    },
    /// A long run at one rate (records on unless --no-records): memory and
    /// CPU of both services sampled over time, and every call record
    /// counted and checked complete at the end.
    Soak {
        #[command(flatten)]
        common: Common,
        /// Calls started per second.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// How long to place calls.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// How often to sample the services' memory and CPU.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        sample_every: Duration,
    },
    /// Raise the rate until calls fail, then bisect: the highest rate with
    /// zero failed calls, and latency at half of it.
    Ramp {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 500.0)]
        start_rate: f64,
        /// Each step multiplies the rate by this.
        #[arg(long, default_value_t = 1.5)]
        factor: f64,
        #[arg(long, default_value_t = 100_000.0)]
        max_rate: f64,
        /// Length of each step.
        #[arg(long, default_value_t = 5.0)]
        step_seconds: f64,
        /// Bisection rounds after the first failing step.
        #[arg(long, default_value_t = 3)]
        refine: u32,
        /// Runs at half the highest clean rate, each on services started
        /// afresh; the run with the median p99 is reported in full.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        half_runs: u32,
    },
    /// N idle connected devices: memory per device and per call.
    Connections {
        #[command(flatten)]
        out: Output,
        #[command(flatten)]
        services: ServiceArgs,
        #[arg(long, default_value_t = 10_000)]
        clients: usize,
        /// How many 127.0.0.x source addresses to spread them over (from
        /// 127.0.0.2).
        #[arg(long, default_value_t = 8)]
        sources: u8,
        /// The devices' streams share this many HTTP/2 connections (as
        /// behind an HTTP/2 proxy); 0: each device has its own.
        #[arg(long, default_value_t = 0)]
        shared_connections: usize,
        /// Connection attempts in flight at once.
        #[arg(long, default_value_t = 512)]
        parallel: usize,
        /// Calls to put in the talking state among them.
        #[arg(long, default_value_t = 1000)]
        active_calls: usize,
        /// Seconds to keep them connected before measuring.
        #[arg(long, default_value_t = 0)]
        hold_seconds: u64,
    },
    /// The transport baseline: a minimal tonic echo server (its own
    /// process) under closed-loop unary and streaming load.
    Echo {
        #[command(flatten)]
        out: Output,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Requests in flight; each value is one run per kind.
        #[arg(long, value_delimiter = ',', default_value = "16,64,256")]
        concurrency: Vec<usize>,
    },
    /// Serve the echo service (started by `echo`).
    #[command(hide = true)]
    EchoServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
    /// Serve the floor relay (started by `--floor`).
    #[command(hide = true)]
    FloorServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// Approve each call here (a business service); without it every
        /// call is approved.
        #[arg(long)]
        business_url: Option<String>,
    },
}

#[derive(Debug, Args)]
struct Output {
    /// Write the result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write a markdown summary here.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// No live progress on stderr.
    #[arg(long)]
    quiet: bool,
}

#[derive(Debug, Args)]
struct ServiceArgs {
    /// The call-service binary (default: next to this one).
    #[arg(long)]
    call_service: Option<PathBuf>,
    /// The business-service binary (default: next to this one).
    #[arg(long)]
    business_service: Option<PathBuf>,
    /// No business service: the call service approves calls itself.
    #[arg(long)]
    no_business: bool,
    /// The business service keeps no call records. By default it keeps
    /// them (SQLite, in a temporary database), as it does in production.
    #[arg(long)]
    no_records: bool,
    /// The call service's ring timeout (the timed-out share waits for it).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    ring_timeout: Duration,
    /// Extra argument for the call service (repeat).
    #[arg(long = "call-arg", allow_hyphen_values = true)]
    call_args: Vec<String>,
    /// Instead of the call service, a relay that keeps no call state and
    /// only forwards (approval included): the floor under the call rate
    /// with the same clients. Answered and rejected calls only.
    #[arg(long)]
    floor: bool,
    /// The call state in Redis (a `redis-server` it starts).
    #[arg(long)]
    redis: bool,
    /// Call-service nodes sharing one Redis; each pair's caller and callee
    /// on different nodes (`connections`: the clients spread over them).
    #[arg(long, default_value_t = 1)]
    nodes: usize,
}

#[derive(Debug, Args)]
struct Common {
    #[command(flatten)]
    out: Output,
    #[command(flatten)]
    services: ServiceArgs,
    /// Caller/callee pairs of connected devices: the concurrency limit.
    #[arg(long, default_value_t = 2000)]
    pairs: usize,
    /// Devices share this many HTTP/2 connections (as behind an HTTP/2
    /// proxy); 0: each device has its own, as a terminal on its own.
    #[arg(long, default_value_t = 0)]
    shared_connections: usize,
    /// How long the callee rings before answering, in ms.
    #[arg(long, default_value_t = 0)]
    answer_delay_ms: u64,
    /// How long an answered call lasts, in ms.
    #[arg(long, default_value_t = 0)]
    hold_ms: u64,
    /// Share of calls the callee rejects (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    reject: f64,
    /// Share of calls the caller cancels while ringing.
    #[arg(long, default_value_t = 0.0)]
    cancel: f64,
    /// Share of calls nobody answers (they end at the ring timeout).
    #[arg(long, default_value_t = 0.0)]
    no_answer: f64,
    /// The longest wait for one event before a call counts as failed, in ms.
    #[arg(long, default_value_t = 5000)]
    patience_ms: u64,
}

impl ServiceArgs {
    fn options(&self) -> ServiceOptions {
        ServiceOptions {
            call_service: self
                .call_service
                .clone()
                .unwrap_or_else(|| sibling("call-service")),
            business_service: self
                .business_service
                .clone()
                .unwrap_or_else(|| sibling("business-service")),
            business: !self.no_business,
            records: !self.no_records,
            ring_timeout: self.ring_timeout,
            call_args: self.call_args.clone(),
            floor: self.floor,
            redis: self.redis,
            nodes: self.nodes,
        }
    }
}

impl Common {
    /// The services, and the pool of devices connected to them.
    async fn start(&self) -> anyhow::Result<(Services, Pool)> {
        let services = Services::start(&self.services.options()).await?;
        let pool = Pool::connect(
            &services.client_urls()?,
            self.pairs,
            self.shared_connections,
            "b",
        )
        .await?;
        Ok((services, pool))
    }

    fn spec(&self, rate: f64, calls: u64) -> anyhow::Result<LoadSpec> {
        let plan = CallPlan {
            answer_delay: Duration::from_millis(self.answer_delay_ms),
            hold: Duration::from_millis(self.hold_ms),
            reject: self.reject,
            cancel: self.cancel,
            timeout: self.no_answer,
            ring_timeout: self.services.ring_timeout,
        };
        let shares = [plan.reject, plan.cancel, plan.timeout];
        if self.services.floor && (plan.cancel > 0.0 || plan.timeout > 0.0) {
            bail!(
                "--floor relays answered and rejected calls only: cancelling and ring timeouts need call state (no --cancel or --no-answer)"
            );
        }
        if shares.iter().any(|s| !(0.0..=1.0).contains(s)) || shares.iter().sum::<f64>() > 1.0 {
            bail!(
                "--reject, --cancel and --no-answer are shares between 0 and 1, summing to at most 1"
            );
        }
        if rate <= 0.0 || !rate.is_finite() {
            bail!("the rate must be positive");
        }
        Ok(LoadSpec {
            rate,
            calls,
            plan,
            patience: Duration::from_millis(self.patience_ms),
        })
    }
}

/// What the machine was, for the report.
#[derive(Debug, Serialize)]
struct Machine {
    cpu: String,
    cores: usize,
    memory_gib: f64,
    kernel: String,
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown".into());
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| {
            v.split_whitespace()
                .next()
                .and_then(|n| n.parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    Machine {
        cpu,
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        memory_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
    }
}

#[derive(Debug, Serialize)]
struct Document<'a, T: Serialize> {
    mode: &'a str,
    machine: Machine,
    result: &'a T,
}

fn write_out<T: Serialize>(
    out: &Output,
    mode: &str,
    result: &T,
    markdown: String,
) -> anyhow::Result<()> {
    println!("{markdown}");
    if let Some(p) = &out.json {
        let doc = Document {
            mode,
            machine: machine(),
            result,
        };
        std::fs::write(p, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    if let Some(p) = &out.markdown {
        std::fs::write(p, markdown).with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Worker threads: one per core unless BENCH_THREADS says otherwise (one
    // thread measured slower: the generator then runs out of its core).
    let threads = std::env::var("BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse::<usize>().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let runtime = match threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build()?,
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // Thousands of connections: take every file descriptor the hard limit allows.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    match cli.command {
        Mode::Calls {
            common,
            rate,
            calls,
            require_clean,
        } => calls_mode(common, rate, calls, require_clean).await,
        Mode::Soak {
            common,
            rate,
            duration,
            sample_every,
        } => soak_mode(common, rate, duration, sample_every).await,
        Mode::Ramp {
            common,
            start_rate,
            factor,
            max_rate,
            step_seconds,
            refine,
            half_runs,
        } => {
            let r = ramp::RampSpec {
                start_rate,
                factor,
                max_rate,
                step_seconds,
                refine,
            };
            ramp_mode(common, r, half_runs).await
        }
        Mode::Connections {
            out,
            services,
            clients,
            sources,
            shared_connections,
            parallel,
            active_calls,
            hold_seconds,
        } => {
            let sources: Vec<IpAddr> = (0..sources.max(1))
                .map(|i| IpAddr::from([127, 0, 0, 2u8.saturating_add(i)]))
                .collect();
            let spec = conns::ConnSpec {
                clients,
                sources,
                shared: shared_connections,
                parallel,
                active_calls,
                hold: Duration::from_secs(hold_seconds),
                quiet: out.quiet,
            };
            connections_mode(out, services, spec).await
        }
        Mode::Echo {
            out,
            seconds,
            connections,
            concurrency,
        } => echo_mode(out, seconds, connections, concurrency).await,
        Mode::FloorServer {
            listen,
            business_url,
        } => floor_server(listen, business_url).await,
        Mode::EchoServer { listen } => echo_server(listen).await,
    }
}

/// `calls`: one rate, a fixed number of calls.
async fn calls_mode(
    common: Common,
    rate: f64,
    calls: u64,
    require_clean: bool,
) -> anyhow::Result<()> {
    let spec = common.spec(rate, calls)?;
    let (services, mut pool) = common.start().await?;
    let step = ramp::step(&services, &mut pool, &spec, common.out.quiet).await?;
    drop(pool);
    services.stop().await;
    write_out(&common.out, "calls", &step, report::step(&step))?;
    if require_clean && !step.clean {
        bail!("not every call went as planned");
    }
    Ok(())
}

/// `soak`: one rate for a long time, memory sampled, records counted.
async fn soak_mode(
    common: Common,
    rate: f64,
    duration: Duration,
    sample_every: Duration,
) -> anyhow::Result<()> {
    let calls = (rate * duration.as_secs_f64()).round() as u64;
    let spec = common.spec(rate, calls)?;
    let (services, mut pool) = common.start().await?;
    let soak =
        videocall_bench::soak::soak(&services, &mut pool, &spec, sample_every, common.out.quiet)
            .await?;
    drop(pool);
    services.stop().await;
    let ok = soak.every_record_complete || soak.records.is_none();
    write_out(
        &common.out,
        "soak",
        &soak,
        videocall_bench::soak::markdown(&soak),
    )?;
    if !ok {
        bail!("not every call has a complete record");
    }
    Ok(())
}

/// `ramp`: the highest clean rate, then latency at half of it.
async fn ramp_mode(common: Common, r: ramp::RampSpec, half_runs: u32) -> anyhow::Result<()> {
    if r.factor <= 1.0 {
        bail!("--factor must be above 1");
    }
    let template = common.spec(r.start_rate, 1)?;
    let (services, mut pool) = common.start().await?;
    let mut result = ramp::ramp(&services, &mut pool, &template, &r, common.out.quiet).await?;
    drop(pool);
    services.stop().await;
    if let Some(rate) = result.max_clean_rate {
        // Latency at half the rate, measured on services and devices
        // that have not just been through an overload, several
        // times: one run's tail is at the mercy of the machine.
        let mut runs = Vec::new();
        for _ in 0..half_runs {
            let (services, mut pool) = common.start().await?;
            let half = ramp::at_rate(
                &services,
                &mut pool,
                &template,
                rate / 2.0,
                r.step_seconds,
                common.out.quiet,
            )
            .await?;
            drop(pool);
            services.stop().await;
            result
                .at_half_p99_ms
                .push(half.load.request_to_start.p99_ms);
            runs.push(half);
        }
        runs.sort_by(|a, b| {
            let p99 = |s: &ramp::Step| s.load.request_to_start.p99_ms;
            p99(a).total_cmp(&p99(b))
        });
        result.at_half = runs.into_iter().nth((half_runs as usize - 1) / 2);
    }
    write_out(&common.out, "ramp", &result, report::ramp(&result))?;
    Ok(())
}

/// `connections`: idle clients, memory per client.
async fn connections_mode(
    out: Output,
    services: ServiceArgs,
    spec: conns::ConnSpec,
) -> anyhow::Result<()> {
    let started = Services::start(&services.options()).await?;
    let result = conns::run(&started, &spec).await?;
    started.stop().await;
    write_out(&out, "connections", &result, report::conns(&result))?;
    Ok(())
}

/// `echo`: the tonic echo baseline.
async fn echo_mode(
    out: Output,
    seconds: f64,
    connections: usize,
    concurrency: Vec<usize>,
) -> anyhow::Result<()> {
    let server = videocall_bench::procs::Server::start(
        "echo-server",
        &std::env::current_exe()?,
        &["echo-server".to_owned()],
    )
    .await?;
    let url = format!("http://{}", server.addr("addr")?);
    let mut results = Vec::new();
    for &c in &concurrency {
        let before = server.sample();
        let mut r = echo::unary(&url, connections, c, seconds).await?;
        let mid = server.sample();
        let mut s = echo::stream(&url, connections, c, seconds).await?;
        let after = server.sample();
        if !out.quiet {
            eprintln!(
                "echo in flight {c}: unary {:.0}/s (server CPU {:.2} s), stream {:.0}/s (server CPU {:.2} s)",
                r.per_s,
                mid.cpu_s - before.cpu_s,
                s.per_s,
                after.cpu_s - mid.cpu_s
            );
        }
        r.server_cpu_s = mid.cpu_s - before.cpu_s;
        s.server_cpu_s = after.cpu_s - mid.cpu_s;
        results.push(r);
        results.push(s);
    }
    server.stop(Duration::from_secs(5)).await;
    write_out(&out, "echo", &results, report::echo(&results))?;
    Ok(())
}

/// The floor relay's server process.
async fn floor_server(
    listen: std::net::SocketAddr,
    business_url: Option<String>,
) -> anyhow::Result<()> {
    let approver = match business_url {
        Some(url) => Some(
            tonic::transport::Endpoint::from_shared(url)?
                .tcp_nodelay(true)
                .connect()
                .await?,
        ),
        None => None,
    };
    let listener = TcpListener::bind(listen).await?;
    println!("floor relay listening: client={}", listener.local_addr()?);
    floor::serve(listener, floor::Floor::new(approver), async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}

/// The echo baseline's server process.
async fn echo_server(listen: std::net::SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("echo listening: addr={}", listener.local_addr()?);
    echo::serve(listener, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
