//! Two scripted phones, alice and bob, walk through the call flow against
//! a running call service (started with `--dev-identity`) and print every
//! control and event, so a newcomer sees the flow:
//!
//! ```text
//! cargo run -p client-sdk --example demo -- --url http://127.0.0.1:50051
//! ```
//!
//! `scripts/demo.sh` starts both services and runs this.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use client_sdk::videocall_proto::v1 as pb;
use client_sdk::{CallEvent, Client, Code, Credentials, EventKind, Events, flags};

#[derive(Debug, Parser)]
struct Args {
    /// The call service's client API.
    #[arg(long, env = "DEMO_CALL_URL", default_value = "http://127.0.0.1:50051")]
    url: String,
    /// The call service's admin API (for the forced hang-up).
    #[arg(long, env = "DEMO_ADMIN_URL", default_value = "http://127.0.0.1:50052")]
    admin_url: String,
    /// A caller the business service blocks.
    #[arg(long, default_value = "mallory")]
    blocked: String,
}

struct Phone {
    name: String,
    client: Client,
    events: Events,
}

impl Phone {
    async fn connect(url: &str, name: &str) -> anyhow::Result<Self> {
        let (client, events) = Client::connect(url.to_owned(), Credentials::dev_user(name))
            .await
            .with_context(|| format!("{name} cannot connect to {url}"))?;
        println!("{name:>7}   connected as device {}", client.connection_id());
        Ok(Self {
            name: name.to_owned(),
            client,
            events,
        })
    }

    /// Prints a control and its result.
    fn sent(&self, what: String, code: Code) {
        println!("{:>7} → {what:<42} result {code}", self.name);
    }

    async fn event(&mut self) -> anyhow::Result<CallEvent> {
        let e = tokio::time::timeout(Duration::from_secs(10), self.events.next())
            .await
            .context("no event within 10 s")?
            .context("the stream ended")?;
        let what = match e.kind {
            EventKind::Request => format!("REQUEST from {} \"{}\"  (ringing)", e.peer, e.user_str),
            EventKind::Reply if e.code.is_ok() => format!("REPLY from {}: accepted", e.peer),
            EventKind::Reply => format!("REPLY from {}: {}", e.peer, e.code),
            EventKind::Start => format!("START with {}, room {}", e.peer, e.param),
            EventKind::Finish if e.code.is_ok() => format!("FINISH with {}: hung up", e.peer),
            EventKind::Finish => format!("FINISH with {}: {}", e.peer, e.code),
        };
        println!("{:>7} ← {what}", self.name);
        Ok(e)
    }

    async fn expect(&mut self, kind: EventKind) -> anyhow::Result<CallEvent> {
        let e = self.event().await?;
        if e.kind != kind {
            bail!("{} expected {kind:?}, got {e:?}", self.name);
        }
        Ok(e)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut alice = Phone::connect(&args.url, "alice").await?;
    let mut bob = Phone::connect(&args.url, "bob").await?;

    println!("\n== 1. alice calls bob, bob answers, they talk, alice hangs up");
    let code = alice
        .client
        .request(
            "bob",
            flags::AUDIO | flags::VIDEO,
            0,
            "hi bob, got a minute?",
        )
        .await?;
    alice.sent("REQUEST bob (audio+video)".into(), code);
    bob.expect(EventKind::Request).await?;
    let code = bob.client.reply("alice", Code::OK).await?;
    bob.sent("REPLY alice 0 (accept)".into(), code);
    alice.expect(EventKind::Reply).await?;
    let room = alice.expect(EventKind::Start).await?.param;
    bob.expect(EventKind::Start).await?;
    println!("          ... media flows in room {room} ...");
    let code = alice.client.finish("bob").await?;
    alice.sent("FINISH bob".into(), code);
    alice.expect(EventKind::Finish).await?;
    bob.expect(EventKind::Finish).await?;

    println!("\n== 2. bob calls alice, alice rejects");
    let code = bob
        .client
        .request("alice", flags::AUDIO, 0, "quick question")
        .await?;
    bob.sent("REQUEST alice (audio)".into(), code);
    alice.expect(EventKind::Request).await?;
    let code = alice.client.reply("bob", Code::REJECTED).await?;
    alice.sent("REPLY bob 100104 (reject)".into(), code);
    bob.expect(EventKind::Reply).await?;
    alice.expect(EventKind::Finish).await?;

    println!("\n== 3. alice calls somebody who is offline");
    let code = alice.client.request("carol", flags::AUDIO, 0, "").await?;
    alice.sent("REQUEST carol".into(), code);
    alice.expect(EventKind::Reply).await?;

    println!(
        "\n== 4. {} is blocked by the business service",
        args.blocked
    );
    let mut mallory = Phone::connect(&args.url, &args.blocked).await?;
    let code = mallory.client.request("bob", flags::AUDIO, 0, "").await?;
    mallory.sent("REQUEST bob".into(), code);
    mallory.expect(EventKind::Reply).await?;

    println!("\n== 5. the business service forces a hang-up (admin API)");
    let code = alice
        .client
        .request("bob", flags::VIDEO, 0, "one more thing")
        .await?;
    alice.sent("REQUEST bob (video)".into(), code);
    bob.expect(EventKind::Request).await?;
    let code = bob.client.reply("alice", Code::OK).await?;
    bob.sent("REPLY alice 0 (accept)".into(), code);
    alice.expect(EventKind::Reply).await?;
    alice.expect(EventKind::Start).await?;
    bob.expect(EventKind::Start).await?;
    let mut admin = pb::call_admin_client::CallAdminClient::connect(args.admin_url.clone())
        .await
        .with_context(|| format!("cannot reach the admin API at {}", args.admin_url))?;
    let r = admin
        .video_call_control(pb::AdminControl {
            event_type: pb::EventType::Finish as i32,
            user_id: "alice".into(),
            error_code: 200_100,
            user_str: "prepaid minutes used up".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    println!(
        "  admin → FINISH alice, code 200100                    result {}",
        Code(r.code)
    );
    alice.expect(EventKind::Finish).await?;
    bob.expect(EventKind::Finish).await?;

    println!("\nThe whole flow worked.");
    Ok(())
}
