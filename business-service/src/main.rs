//! `business-service`: runs the reference business hook, or drives the call
//! service's admin API from the command line.

use std::net::SocketAddr;

use anyhow::Context;
use business_service::{DEFAULT_REFUSAL_CODE, Hook, Policy, admin::Admin};
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;
use videocall_proto::v1 as pb;

#[derive(Debug, Parser)]
#[command(
    name = "business-service",
    version,
    about = "Reference business service for the video-call system"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the BusinessHook API (approvals and call events).
    Serve {
        /// Where the call service reaches this hook.
        #[arg(long, env = "BUSINESS_SERVICE_ADDR", default_value = "127.0.0.1:50061")]
        listen: SocketAddr,
        /// Refuse calls from this user (repeat, or comma-separate).
        #[arg(
            long = "block-caller",
            env = "BUSINESS_SERVICE_BLOCK_CALLERS",
            value_delimiter = ','
        )]
        block_callers: Vec<String>,
        /// The result code a blocked caller gets.
        #[arg(long, env = "BUSINESS_SERVICE_REFUSAL_CODE", default_value_t = DEFAULT_REFUSAL_CODE)]
        refusal_code: u32,
    },
    /// Forced hang-up: end a user's call through the call service's admin API.
    Hangup {
        #[arg(
            long,
            env = "CALL_SERVICE_ADMIN_URL",
            default_value = "http://127.0.0.1:50052"
        )]
        admin_url: String,
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
    /// List live calls.
    Calls {
        #[arg(
            long,
            env = "CALL_SERVICE_ADMIN_URL",
            default_value = "http://127.0.0.1:50052"
        )]
        admin_url: String,
    },
    /// Show a user's state.
    State {
        #[arg(
            long,
            env = "CALL_SERVICE_ADMIN_URL",
            default_value = "http://127.0.0.1:50052"
        )]
        admin_url: String,
        #[arg(long)]
        user: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Serve {
            listen,
            block_callers,
            refusal_code,
        } => {
            let policy = Policy {
                blocked_callers: block_callers
                    .into_iter()
                    .filter(|u| !u.is_empty())
                    .map(|u| (u, refusal_code))
                    .collect(),
            };
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            println!(
                "business-service listening: hook={}",
                listener.local_addr()?
            );
            business_service::serve(listener, Hook::new(policy), shutdown_signal()).await?;
        }
        Command::Hangup {
            admin_url,
            user,
            code,
            message,
        } => {
            let r = Admin::connect(admin_url)
                .await?
                .hang_up(&user, code, &message)
                .await?;
            if r.code == 0 {
                println!("ended call {} of {user}", r.call_id);
            } else {
                anyhow::bail!("not ended: result code {}", r.code);
            }
        }
        Command::Calls { admin_url } => {
            let calls = Admin::connect(admin_url).await?.calls().await?;
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
        }
        Command::State { admin_url, user } => {
            let s = Admin::connect(admin_url).await?.user_state(&user).await?;
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
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
