//! Two scripted phones on a cluster of call-service nodes behind a load
//! balancer: alice and bob land on different nodes and talk; then alice's
//! node is killed (SIGKILL) in the middle of the call, alice's client
//! comes back through the balancer to another node and resumes, bob sees
//! nothing, and the call goes on until bob hangs up.
//!
//! `scripts/cluster-demo.sh` starts Redis, three nodes, HAProxy and the
//! business service, and runs this with each node's process id:
//!
//! ```text
//! cargo run -p client-sdk --example cluster_demo -- --url http://127.0.0.1:50150 --node 2=1234 --node 3=1235 --node 4=1236
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use client_sdk::{CallEvent, Client, Code, Credentials, Events};

#[derive(Debug, Parser)]
struct Args {
    /// The load balancer in front of the nodes' client APIs.
    #[arg(long, default_value = "http://127.0.0.1:50150")]
    url: String,
    /// A node's id and its process id (`ID=PID`), repeated.
    #[arg(long = "node", value_parser = node_pid)]
    nodes: Vec<(u64, u32)>,
}

fn node_pid(s: &str) -> Result<(u64, u32), String> {
    let (n, p) = s.split_once('=').ok_or("ID=PID")?;
    Ok((
        n.parse().map_err(|_| "a node id")?,
        p.parse().map_err(|_| "a pid")?,
    ))
}

/// The node a device id belongs to (its top 24 bits).
fn node_of(client: &Client) -> u64 {
    client.connection_id().parse::<u64>().unwrap_or(0) >> 40
}

struct Phone {
    name: &'static str,
    client: Client,
    events: Events,
}

impl Phone {
    async fn connect(url: &str, name: &'static str) -> anyhow::Result<Self> {
        let (client, events) = Client::connect(url.to_owned(), Credentials::dev_user(name))
            .await
            .with_context(|| format!("{name} cannot connect to {url}"))?;
        println!(
            "{name:>6}   connected through the balancer: device {}, on node {}",
            client.connection_id(),
            node_of(&client)
        );
        Ok(Self {
            name,
            client,
            events,
        })
    }

    async fn event(&mut self) -> anyhow::Result<CallEvent> {
        let e = tokio::time::timeout(Duration::from_secs(20), self.events.next())
            .await
            .context("no event within 20 s")?
            .context("the stream ended")?;
        println!(
            "{:>6} ← {:?} from {} code {}{}",
            self.name,
            e.kind,
            e.peer,
            e.code,
            e.room_id()
                .map(|r| format!(", room {r}"))
                .unwrap_or_default()
        );
        Ok(e)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut alice = Phone::connect(&args.url, "alice").await?;
    let mut bob = Phone::connect(&args.url, "bob").await?;
    let (a_node, b_node) = (node_of(&alice.client), node_of(&bob.client));
    if a_node == b_node {
        bail!("alice and bob landed on the same node: is the balancer round-robin?");
    }
    println!("\n== a call between two nodes");
    let code = alice
        .client
        .request("bob", 0, 0, "hello from node A")
        .await?;
    println!(" alice → REQUEST to bob: result {code}");
    bob.event().await?;
    let code = bob.client.reply("alice", Code::OK).await?;
    println!("   bob → REPLY 0 (answer): result {code}");
    alice.event().await?;
    alice.event().await?;
    bob.event().await?;

    println!("\n== alice's node {a_node} is killed (SIGKILL) in the middle of the call");
    let pid = args
        .nodes
        .iter()
        .find(|(n, _)| *n == a_node)
        .map(|(_, p)| *p)
        .context("no --node for alice's node")?;
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()?
        .success();
    if !killed {
        bail!("could not kill node {a_node} (pid {pid})");
    }
    let device = alice.client.connection_id().to_owned();
    let began = Instant::now();
    // Alice's SDK reconnects by itself; a control is answered once it is back.
    loop {
        if let Ok(code) = alice.client.finish("nobody").await
            && code == Code::NOT_IN_CALL
        {
            break;
        }
        if began.elapsed() > Duration::from_secs(20) {
            bail!("alice did not come back");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if alice.client.connection_id() != device {
        bail!("alice came back as a new device: her call is over");
    }
    println!(
        " alice   back after {:.1} s, the same device {device}, resumed through the balancer",
        began.elapsed().as_secs_f64()
    );
    // A control's result comes on the same ordered stream as events: once
    // it is back, anything sent to bob before it has arrived.
    bob.client.finish("nobody").await?;
    if let Some(e) = bob.events.try_next() {
        bail!("bob saw something: {e:?}");
    }
    println!("   bob   saw nothing: the call goes on");

    println!("\n== bob hangs up; alice hears it through her new node");
    let code = bob.client.finish("alice").await?;
    println!("   bob → FINISH: result {code}");
    alice.event().await?;
    bob.event().await?;
    println!("\nThe call survived the loss of its caller's node.");
    Ok(())
}
