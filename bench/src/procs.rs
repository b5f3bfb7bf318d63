//! The servers under test as separate processes, and what they cost: CPU
//! seconds and resident memory read from `/proc`, counters scraped from
//! their Prometheus endpoint.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// CPU time and memory of one process at one instant (Linux `/proc`).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ProcSample {
    /// User + system CPU seconds since the process started.
    pub cpu_s: f64,
    /// Resident set size now, KiB.
    pub rss_kib: u64,
    /// Peak resident set size since the process started, KiB.
    pub peak_rss_kib: u64,
}

/// Reads `/proc/<pid>`; `None` once the process is gone (or off Linux).
pub fn sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some(ProcSample {
        // The kernel's clock tick is 100 Hz on every Linux platform we run on.
        cpu_s: ticks as f64 / 100.0,
        rss_kib: kib("VmRSS:"),
        peak_rss_kib: kib("VmHWM:"),
    })
}

/// What a process spent over a run: the difference of two samples, with the
/// peak memory seen.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ProcCost {
    pub cpu_s: f64,
    pub rss_kib: u64,
    pub peak_rss_kib: u64,
}

impl ProcCost {
    pub fn between(before: ProcSample, after: ProcSample) -> Self {
        Self {
            cpu_s: after.cpu_s - before.cpu_s,
            rss_kib: after.rss_kib,
            peak_rss_kib: after.peak_rss_kib,
        }
    }
}

/// Where the service binaries are: next to this one (same `target/<profile>`).
pub fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default()
        .join(name)
}

/// One running server process; killed when dropped.
#[derive(Debug)]
pub struct Server {
    pub name: &'static str,
    child: Child,
    pid: u32,
    /// `key=value` pairs from its "listening" line.
    listening: String,
}

impl Server {
    /// Starts `program` and waits for its "listening" line on stdout.
    pub async fn start(
        name: &'static str,
        program: &Path,
        args: &[String],
    ) -> anyhow::Result<Self> {
        Self::start_until(name, program, args, "listening:").await
    }

    /// Starts `program` and waits for a stdout line containing `ready`.
    pub async fn start_until(
        name: &'static str,
        program: &Path,
        args: &[String],
        ready: &str,
    ) -> anyhow::Result<Self> {
        let mut child = Command::new(program)
            .args(args)
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        let pid = child.id().context("no pid")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let listening = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                if line.contains(ready) {
                    return Ok(line);
                }
            }
            bail!("{name} exited before it was listening")
        })
        .await
        .with_context(|| format!("{name} did not start in 30 s"))??;
        // Keep draining stdout so the process never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            name,
            child,
            pid,
            listening,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The address it printed for `key` (`client`, `hook`, `metrics`, ...).
    pub fn addr(&self, key: &str) -> anyhow::Result<String> {
        self.listening
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
            .with_context(|| format!("no {key}= in {:?}", self.listening))
    }

    pub fn sample(&self) -> ProcSample {
        sample(self.pid).unwrap_or_default()
    }

    /// Asks it to stop (SIGTERM via `kill`) and waits at most `patience`.
    pub async fn stop(mut self, patience: Duration) {
        let _ = Command::new("kill")
            .arg(self.pid.to_string())
            .status()
            .await;
        if tokio::time::timeout(patience, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// The call service and an approving business service, started for a run.
#[derive(Debug)]
pub struct Services {
    pub call: Server,
    /// The other nodes of a cluster (`--nodes`).
    pub nodes: Vec<Server>,
    /// The cluster's Redis (`--redis`), and its port.
    pub redis: Option<(Server, u16)>,
    pub business: Option<Server>,
    /// `call` is the floor relay, which has no metrics endpoint.
    floor: bool,
    /// Holds the business service's records database.
    _dir: Option<tempfile::TempDir>,
    /// The records database, when the business service keeps records.
    records_db: Option<PathBuf>,
}

/// Settings of the services a run starts.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    pub call_service: PathBuf,
    pub business_service: PathBuf,
    /// Without it, the call service approves every call itself (no hook).
    pub business: bool,
    /// Keep call records in SQLite (the reference business service's default).
    pub records: bool,
    pub ring_timeout: Duration,
    /// Extra `call-service` arguments.
    pub call_args: Vec<String>,
    /// Instead of the call service, the stateless relay of [`crate::floor`]
    /// (this binary's `floor-server`), approving through the business service.
    pub floor: bool,
    /// The call state in a Redis it starts (`redis-server`, no persistence).
    pub redis: bool,
    /// Call-service nodes (more than one: on Redis).
    pub nodes: usize,
}

impl Services {
    pub async fn start(o: &ServiceOptions) -> anyhow::Result<Self> {
        let mut dir = None;
        let mut records_db = None;
        let business = if o.business {
            let mut args: Vec<String> = [
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-addr",
                "127.0.0.1:0",
            ]
            .map(String::from)
            .to_vec();
            let d = tempfile::Builder::new()
                .prefix("videocall-bench-")
                .tempdir()?;
            // The generator's pairs call each other back to back, rejected
            // calls included: no person re-dials like that, so the re-dial
            // rule (on by default) is off here.
            let policy = d.path().join("policy.toml");
            std::fs::write(&policy, "[redial]\nafter_rejection = \"0s\"\ncalls = 0\n")?;
            args.push("--policy".into());
            args.push(policy.display().to_string());
            if o.records {
                let db = d.path().join("records.db");
                args.push("--database".into());
                args.push(db.display().to_string());
                records_db = Some(db);
            } else {
                args.push("--no-records".into());
            }
            dir = Some(d);
            Some(Server::start("business-service", &o.business_service, &args).await?)
        } else {
            None
        };
        if o.floor {
            let mut args = vec!["floor-server".to_owned()];
            if let Some(b) = &business {
                args.push("--business-url".into());
                args.push(format!("http://{}", b.addr("hook")?));
            }
            let exe = std::env::current_exe()?;
            let call = Server::start("floor-relay", &exe, &args).await?;
            return Ok(Self {
                call,
                nodes: Vec::new(),
                redis: None,
                business,
                floor: true,
                _dir: dir,
                records_db,
            });
        }
        let mut args: Vec<String> = [
            "--client-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--dev-identity",
            // A load generator is one very busy client per device: lift the
            // per-connection and per-node limits that protect a real node.
            "--controls-per-second",
            "1000000",
            "--control-burst",
            "1000000",
            "--max-connections",
            "1000000",
            "--max-pending-approvals",
            "1000000",
            // Every generated device comes from 127.0.0.1.
            "--max-connections-per-peer",
            "1000000",
            "--max-notices-per-caller",
            "1000000",
            "--resume-grace",
            "0s",
        ]
        .map(String::from)
        .to_vec();
        args.push("--ring-timeout".into());
        args.push(format!("{}ms", o.ring_timeout.as_millis()));
        if let Some(b) = &business {
            args.push("--business-url".into());
            args.push(format!("http://{}", b.addr("hook")?));
        }
        args.extend(o.call_args.iter().cloned());
        let redis = if o.redis || o.nodes > 1 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let redis_args: Vec<String> = [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ]
            .map(String::from)
            .to_vec();
            let server = Server::start_until(
                "redis-server",
                Path::new("redis-server"),
                &redis_args,
                "Ready to accept connections",
            )
            .await
            .context("redis-server (Debian's package) for --redis")?;
            args.push("--redis-url".into());
            args.push(format!("redis://127.0.0.1:{port}/"));
            Some((server, port))
        } else {
            None
        };
        let call = Server::start("call-service", &o.call_service, &args).await?;
        let mut nodes = Vec::new();
        for _ in 1..o.nodes.max(1) {
            nodes.push(Server::start("call-service", &o.call_service, &args).await?);
        }
        Ok(Self {
            call,
            nodes,
            redis,
            business,
            floor: false,
            _dir: dir,
            records_db,
        })
    }

    /// The call service's metrics endpoint; none for the floor relay.
    pub fn metrics(&self) -> anyhow::Result<Option<String>> {
        match self.floor {
            true => Ok(None),
            false => self.call.addr("metrics").map(Some),
        }
    }

    /// Every call-service node (the first node first).
    pub fn call_nodes(&self) -> impl Iterator<Item = &Server> {
        std::iter::once(&self.call).chain(&self.nodes)
    }

    /// Every node's client API (the first node's first).
    pub fn client_urls(&self) -> anyhow::Result<Vec<String>> {
        self.call_nodes()
            .map(|n| Ok(format!("http://{}", n.addr("client")?)))
            .collect()
    }

    /// Every node's metrics endpoint (none for the floor relay).
    pub fn all_metrics(&self) -> anyhow::Result<Vec<String>> {
        if self.floor {
            return Ok(Vec::new());
        }
        self.call_nodes().map(|n| n.addr("metrics")).collect()
    }

    /// A section of Redis's `INFO`, if there is a Redis.
    async fn redis_info(&self, section: &str) -> anyhow::Result<Option<String>> {
        let Some((_, port)) = &self.redis else {
            return Ok(None);
        };
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "INFO", section])
            .output()
            .await
            .context("redis-cli")?;
        Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
    }

    /// Commands Redis has run so far (`INFO commandstats`, scripts' own
    /// commands included), if there is one.
    pub async fn redis_commands(&self) -> anyhow::Result<Option<f64>> {
        Ok(self.redis_info("commandstats").await?.map(|text| {
            text.lines()
                .filter_map(|l| l.split("calls=").nth(1))
                .filter_map(|v| v.split(',').next()?.parse::<f64>().ok())
                .sum()
        }))
    }

    /// The memory Redis holds for data (`used_memory`, bytes), if there
    /// is one.
    pub async fn redis_used_memory(&self) -> anyhow::Result<Option<u64>> {
        Ok(self.redis_info("memory").await?.and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("used_memory:"))
                .and_then(|v| v.trim().parse().ok())
        }))
    }

    /// The business service's records database, if it keeps one.
    pub fn records_db(&self) -> Option<&std::path::Path> {
        self.records_db.as_deref()
    }

    /// Each server process's name and pid.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        let mut v = vec![(self.call.name, self.call.pid())];
        v.extend(self.nodes.iter().map(|n| (n.name, n.pid())));
        v.extend(self.redis.iter().map(|(r, _)| (r.name, r.pid())));
        if let Some(b) = &self.business {
            v.push((b.name, b.pid()));
        }
        v
    }

    pub fn samples(&self) -> Vec<(&'static str, ProcSample)> {
        let mut v = vec![(self.call.name, self.call.sample())];
        v.extend(self.nodes.iter().map(|n| (n.name, n.sample())));
        v.extend(self.redis.iter().map(|(r, _)| (r.name, r.sample())));
        if let Some(b) = &self.business {
            v.push((b.name, b.sample()));
        }
        v
    }

    pub async fn stop(self) {
        self.call.stop(Duration::from_secs(10)).await;
        for n in self.nodes {
            n.stop(Duration::from_secs(10)).await;
        }
        if let Some((r, _)) = self.redis {
            r.stop(Duration::from_secs(10)).await;
        }
        if let Some(b) = self.business {
            b.stop(Duration::from_secs(10)).await;
        }
    }
}

/// The value of one un-labelled metric (or the sum over its labels) from a
/// Prometheus text endpoint at `addr` (`host:port`).
pub async fn scrape(addr: &str, metric: &str) -> anyhow::Result<f64> {
    let text = fetch_metrics(addr).await?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            let bare = name.split('{').next()?;
            (bare == metric).then(|| value.parse::<f64>().ok())?
        })
        .sum())
}

async fn fetch_metrics(addr: &str) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    Ok(body
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default())
}
