//! `business-service`: runs the reference business hook, drives the call
//! service's admin API from the command line, reads call records, and
//! mints client tokens.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use business_service::admin::{Admin, AdminAccess};
use business_service::records::{self, CallRecord, Query};
use business_service::{Business, Config};
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use videocall_proto::v1 as pb;

#[derive(Debug, Parser)]
#[command(
    name = "business-service",
    version,
    about = "Reference business service for the video-call system"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        env = "LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: videocall_telemetry::LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How to reach the call service's admin API.
#[derive(Debug, clap::Args)]
struct AdminArgs {
    /// The call service's admin API.
    #[arg(
        long,
        env = "CALL_SERVICE_ADMIN_URL",
        default_value = "http://127.0.0.1:50052"
    )]
    admin_url: String,
    /// The admin API's secret (the call service's --admin-token).
    #[arg(long, env = "CALL_SERVICE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// For an https:// admin URL: the CA of the call service's certificate (PEM).
    #[arg(long, env = "CALL_SERVICE_ADMIN_CA")]
    admin_ca: Option<PathBuf>,
    /// For mutual TLS: this client's certificate (PEM); with --admin-client-key.
    #[arg(
        long,
        env = "CALL_SERVICE_ADMIN_CLIENT_CERT",
        requires = "admin_client_key"
    )]
    admin_client_cert: Option<PathBuf>,
    /// For mutual TLS: this client's key (PEM).
    #[arg(
        long,
        env = "CALL_SERVICE_ADMIN_CLIENT_KEY",
        requires = "admin_client_cert"
    )]
    admin_client_key: Option<PathBuf>,
}

impl AdminArgs {
    fn access(&self) -> anyhow::Result<AdminAccess> {
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        Ok(AdminAccess {
            token: self.admin_token.clone(),
            ca_pem: self.admin_ca.as_ref().map(read).transpose()?,
            identity: match (&self.admin_client_cert, &self.admin_client_key) {
                (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
                _ => None,
            },
        })
    }

    async fn connect(&self) -> anyhow::Result<Admin> {
        Ok(Admin::connect_with(self.admin_url.clone(), self.access()?).await?)
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the BusinessHook API (approvals and call events).
    Serve(Box<ServeArgs>),
    /// Exit 0 if the business service at --url reports SERVING (gRPC
    /// health), 1 otherwise. For container health checks.
    Healthcheck {
        #[arg(long, default_value = "http://127.0.0.1:50061")]
        url: String,
    },
    /// Forced hang-up: end a user's call through the call service's admin API.
    Hangup {
        #[command(flatten)]
        admin: AdminArgs,
        /// Whose call to end.
        #[arg(long)]
        user: String,
        /// The reason code both parties receive (0: normal hang-up).
        #[arg(long, default_value_t = 0)]
        code: u32,
        /// A message both parties receive.
        #[arg(long, default_value = "")]
        message: String,
    },
    /// List live calls (admin API).
    Calls {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show a user's state (admin API).
    State {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long)]
        user: String,
    },
    /// Read call detail records.
    Records {
        /// The records database the service writes.
        #[arg(
            long,
            env = "BUSINESS_SERVICE_DATABASE",
            default_value = "call-records.db"
        )]
        database: PathBuf,
        /// At most this many records, newest first.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print CSV (with a header) instead of a table.
        #[arg(long)]
        csv: bool,
        #[command(subcommand)]
        which: Which,
    },
    /// Mint a client token (JWT) naming a user, for testing and demos.
    /// HS256 with --secret, or RS256/ES256 with --private-key.
    Token {
        /// The user the token names (`sub`).
        #[arg(long)]
        user: String,
        /// How long it is valid.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// The shared secret (the call service's --jwt-secret).
        #[arg(long, env = "CALL_SERVICE_JWT_SECRET", hide_env_values = true)]
        secret: Option<String>,
        /// A PEM private key (RSA or EC P-256) whose public key the call
        /// service has (--jwt-public-key).
        #[arg(
            long,
            env = "BUSINESS_SERVICE_JWT_PRIVATE_KEY",
            conflicts_with = "secret"
        )]
        private_key: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum Which {
    /// The most recent calls.
    Recent,
    /// Calls a user placed or received.
    User { user: String },
    /// Calls to a user that never started.
    Missed { user: String },
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Where the call service reaches this hook.
    #[arg(long, env = "BUSINESS_SERVICE_ADDR", default_value = "127.0.0.1:50061")]
    listen: SocketAddr,
    /// The policy file (TOML). Reloaded when it changes and on SIGHUP; a bad
    /// file is refused and the previous policy stays in force.
    #[arg(long, env = "BUSINESS_SERVICE_POLICY")]
    policy: Option<PathBuf>,
    /// How often the policy file is checked for changes.
    #[arg(long, env = "BUSINESS_SERVICE_RELOAD_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    reload_interval: Duration,
    /// Refuse calls from this user, on top of the policy (repeat, or comma-separate).
    #[arg(
        long = "block-caller",
        env = "BUSINESS_SERVICE_BLOCK_CALLERS",
        value_delimiter = ','
    )]
    block_callers: Vec<String>,
    /// The result code a caller blocked with --block-caller gets.
    #[arg(long, env = "BUSINESS_SERVICE_REFUSAL_CODE", default_value_t = 200_001)]
    refusal_code: u32,
    /// The call records database (SQLite), created if missing.
    #[arg(
        long,
        env = "BUSINESS_SERVICE_DATABASE",
        default_value = "call-records.db"
    )]
    database: PathBuf,
    /// Keep no call records.
    #[arg(long)]
    no_records: bool,
    /// Enforce the policy's maximum call duration through the call
    /// service's admin API (forced FINISH).
    #[arg(long, env = "BUSINESS_SERVICE_ENFORCE_DURATION")]
    enforce_duration: bool,
    #[command(flatten)]
    admin: AdminArgs,
    /// Where Prometheus scrapes `/metrics` (HTTP).
    #[arg(
        long,
        env = "BUSINESS_SERVICE_METRICS_ADDR",
        default_value = "127.0.0.1:9161"
    )]
    metrics_addr: SocketAddr,
    /// Serve no metrics.
    #[arg(long, env = "BUSINESS_SERVICE_NO_METRICS")]
    no_metrics: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    videocall_telemetry::init_logging(cli.log_format);
    match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Healthcheck { url } => {
            videocall_telemetry::healthcheck(&url, Duration::from_secs(3)).await?;
            Ok(())
        }
        Command::Hangup {
            admin,
            user,
            code,
            message,
        } => hang_up(admin, &user, code, &message).await,
        Command::Calls { admin } => calls(admin).await,
        Command::State { admin, user } => state(admin, &user).await,
        Command::Records {
            database,
            limit,
            csv,
            which,
        } => show_records(&database, limit, csv, &which),
        Command::Token {
            user,
            ttl,
            secret,
            private_key,
        } => token(user, ttl, secret, private_key),
    }
}

/// `hangup`: a forced FINISH through the call service's admin API.
async fn hang_up(admin: AdminArgs, user: &str, code: u32, message: &str) -> anyhow::Result<()> {
    let r = admin.connect().await?.hang_up(user, code, message).await?;
    if r.code != 0 {
        anyhow::bail!("not ended: result code {}", r.code);
    }
    println!("ended call {} of {user}", r.call_id);
    Ok(())
}

/// `calls`: the live calls.
async fn calls(admin: AdminArgs) -> anyhow::Result<()> {
    let calls = admin.connect().await?.calls().await?;
    println!("{} live call(s)", calls.len());
    for c in calls {
        let phase = pb::CallPhase::try_from(c.phase)
            .map(|p| p.as_str_name())
            .unwrap_or("?");
        println!(
            "{}  {} -> {}  {phase}  room={}  age={}ms",
            c.call_id, c.caller_user_id, c.callee_user_id, c.room_id, c.age_ms
        );
    }
    Ok(())
}

/// `state`: one user's state.
async fn state(admin: AdminArgs, user: &str) -> anyhow::Result<()> {
    let s = admin.connect().await?.user_state(user).await?;
    let state = pb::UserState::try_from(s.state)
        .map(|p| p.as_str_name())
        .unwrap_or("?");
    print!("{user}: {state}, {} device(s)", s.connections);
    match s.call {
        Some(c) => println!(
            ", call {} ({} -> {})",
            c.call_id, c.caller_user_id, c.callee_user_id
        ),
        None => println!(),
    }
    Ok(())
}

/// `records`: call detail records, as a table or CSV.
fn show_records(database: &Path, limit: usize, csv: bool, which: &Which) -> anyhow::Result<()> {
    if !database.exists() {
        anyhow::bail!("no call records database at {}", database.display());
    }
    let conn = records::open(database)?;
    let q = match which {
        Which::Recent => Query::Recent,
        Which::User { user } => Query::User(user),
        Which::Missed { user } => Query::Missed(user),
    };
    let rows = records::query(&conn, q, limit)?;
    if csv {
        records::write_csv(std::io::stdout().lock(), &rows)?;
    } else {
        print_table(&rows);
    }
    Ok(())
}

/// `token`: a client token for development and tests.
fn token(
    user: String,
    ttl: Duration,
    secret: Option<String>,
    private_key: Option<PathBuf>,
) -> anyhow::Result<()> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let claims = business_service::tokens::Claims {
        sub: user,
        iat: now,
        exp: now + ttl.as_secs(),
        nbf: None,
    };
    let token = match (secret, private_key) {
        (Some(secret), _) => business_service::tokens::hs256(&claims, secret.as_bytes())?,
        (None, Some(path)) => {
            let pem =
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            business_service::tokens::signed(&claims, &pem)?
        }
        (None, None) => anyhow::bail!("give --secret (HS256) or --private-key (RS256/ES256)"),
    };
    println!("{token}");
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config {
        policy_file: args.policy,
        extra_blocked: args
            .block_callers
            .into_iter()
            .filter(|u| !u.is_empty())
            .map(|u| (u, args.refusal_code))
            .collect(),
        reload_interval: Some(args.reload_interval),
        database: (!args.no_records).then_some(args.database),
        admin_url: args.enforce_duration.then(|| args.admin.admin_url.clone()),
        admin_access: args.admin.access()?,
    };
    let business = Business::start(config).context("cannot start")?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let metrics = match args.no_metrics {
        true => None,
        false => Some(
            TcpListener::bind(args.metrics_addr)
                .await
                .with_context(|| format!("cannot listen on {} (metrics)", args.metrics_addr))?,
        ),
    };
    println!(
        "business-service listening: hook={} metrics={}",
        listener.local_addr()?,
        match &metrics {
            Some(m) => m.local_addr()?.to_string(),
            None => "off".into(),
        }
    );
    #[cfg(unix)]
    {
        let hook = business.hook().clone();
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        // Ends with the process; it holds nothing that needs closing.
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                hook.policy().reload_logged("SIGHUP");
            }
        });
    }
    business
        .serve(listener, metrics, videocall_telemetry::shutdown_signal())
        .await?;
    Ok(())
}

fn print_table(rows: &[CallRecord]) {
    let time = |ms: Option<i64>| {
        ms.and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
            .map(|t| t.strftime("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "{:<36}  {:<12} {:<12} {:<19} {:>8}  {:>7}  {:<10} outcome",
        "call", "caller", "callee", "requested (UTC)", "duration", "code", "ended by"
    );
    for r in rows {
        let duration = r
            .duration_ms
            .map(|d| format!("{:.1}s", d as f64 / 1000.0))
            .unwrap_or_else(|| "-".into());
        let outcome = match (r.complete, r.missed) {
            (false, _) => "in progress / incomplete",
            (true, true) => "missed",
            (true, false) => "answered",
        };
        println!(
            "{:<36}  {:<12} {:<12} {:<19} {:>8}  {:>7}  {:<10} {outcome}",
            r.call_id,
            r.caller,
            r.callee,
            time(r.requested_ms),
            duration,
            r.end_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            r.ended_by.as_deref().unwrap_or("-"),
        );
    }
}
