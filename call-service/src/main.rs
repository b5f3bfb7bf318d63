//! `call-service`: parses configuration, sets up logging and signals, binds
//! the listeners and runs [`call_service::serve`].

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = call_service::Config::parse();
    videocall_telemetry::init_logging(config.log_format);

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
    // One line on stdout, for people and for scripts that started us on port 0.
    println!(
        "call-service listening: client={} admin={} metrics={}",
        client.local_addr()?,
        admin.local_addr()?,
        match &metrics {
            Some(m) => m.local_addr()?.to_string(),
            None => "off".into(),
        }
    );
    let listeners = call_service::Listeners {
        client,
        admin,
        metrics,
    };
    call_service::serve(listeners, config, videocall_telemetry::shutdown_signal()).await?;
    Ok(())
}
