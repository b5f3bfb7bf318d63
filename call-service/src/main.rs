//! `call-service`: parses configuration, sets up logging and signals, binds
//! the listeners and runs [`call_service::serve`]; `call-service
//! healthcheck` asks a running one whether it is SERVING (for container
//! health checks, where no other client is at hand).

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
#[command(name = "call-service", version, about = "Video-call signaling service")]
struct Cli {
    #[command(flatten)]
    config: call_service::Config,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Exit 0 if the call service on this machine's client port (or at
    /// `--addr`) reports SERVING (gRPC health), 1 otherwise.
    Healthcheck {
        /// HOST:PORT of the call service to ask instead, e.g. from a load
        /// balancer's external check.
        #[arg(long, value_name = "HOST:PORT")]
        addr: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.config;
    if let Some(Command::Healthcheck { addr }) = cli.command {
        let addr = addr.unwrap_or_else(|| format!("127.0.0.1:{}", config.client_addr.port()));
        let url = format!("http://{addr}");
        videocall_telemetry::healthcheck(&url, Duration::from_secs(3)).await?;
        return Ok(());
    }
    videocall_telemetry::init_logging(config.log_format);
    // Refuse a configuration that cannot run before saying "listening".
    call_service::server::check(&config, config.admin_addr)?;

    let bind = |addr, what: &'static str| async move {
        TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} ({what})"))
    };
    let client = bind(config.client_addr, "client API").await?;
    let admin = bind(config.admin_addr, "admin API").await?;
    let metrics = match config.no_metrics {
        true => None,
        false => Some(bind(config.metrics_addr, "metrics").await?),
    };
    let web = match config.web_addr {
        Some(addr) => Some(bind(addr, "web").await?),
        None => None,
    };
    let shown = |l: &Option<TcpListener>| -> anyhow::Result<String> {
        Ok(match l {
            Some(l) => l.local_addr()?.to_string(),
            None => "off".into(),
        })
    };
    // One line on stdout, for people and for scripts that started us on port 0.
    println!(
        "call-service listening: client={} admin={} metrics={} web={}",
        client.local_addr()?,
        admin.local_addr()?,
        shown(&metrics)?,
        shown(&web)?,
    );
    let listeners = call_service::Listeners {
        client,
        admin,
        metrics,
        web,
    };
    call_service::serve(listeners, config, videocall_telemetry::shutdown_signal()).await?;
    Ok(())
}
