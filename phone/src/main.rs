//! `phone`: a terminal phone. Dial, answer, reject and hang up from a
//! prompt; incoming calls, answers, START (with the room id) and every
//! FINISH are shown as they happen, with their reasons in words.
//!
//! ```text
//! phone --user alice                          # development identity
//! phone --user alice --token JWT              # a signed token
//! phone --user alice --token-file alice.jwt   # re-read whenever a token is needed
//! phone --user alice --token-command 'business-service token --user alice --ttl 10m'
//! ```
//!
//! With `--token-file` or `--token-command` a call outlives its tokens:
//! the phone gets a new one when the service asks (before expiry) and
//! before every reconnect, and hands it over on the live stream.
//!
//! Layout (one file): [`Args`]; [`Ui`] prints (colours on a terminal, none
//! with NO_COLOR); [`Phone`] keeps what the user is doing and turns
//! commands and events into text.

use std::io::{IsTerminal, Write};

use clap::Parser;
use client_sdk::{CallEvent, Client, Code, Credentials, EventKind, Events, flags};
use tokio::io::{AsyncBufReadExt, BufReader};
use videocall_proto::text::escape;

#[derive(Debug, Parser)]
#[command(
    name = "phone",
    version,
    about = "A terminal phone for the video-call system"
)]
struct Args {
    /// Who you are.
    #[arg(long, env = "PHONE_USER")]
    user: String,
    /// The call service's client API.
    #[arg(long, env = "PHONE_URL", default_value = "http://127.0.0.1:50051")]
    url: String,
    /// A signed token; without a token option the development identity is
    /// used (the call service must run with --dev-identity). It cannot be
    /// renewed: the stream ends when it expires.
    #[arg(long, env = "PHONE_TOKEN", conflicts_with_all = ["token_file", "token_command"])]
    token: Option<String>,
    /// A file holding a signed token, read again each time a token is
    /// needed (keep it fresh, and the call goes on past each token's life).
    #[arg(long, env = "PHONE_TOKEN_FILE", conflicts_with = "token_command")]
    token_file: Option<std::path::PathBuf>,
    /// A shell command that prints a signed token, run each time a token is
    /// needed.
    #[arg(long, env = "PHONE_TOKEN_COMMAND")]
    token_command: Option<String>,
}

/// Reads a token from `path`.
async fn token_from_file(path: std::path::PathBuf) -> anyhow::Result<String> {
    let text = tokio::fs::read_to_string(&path)
        .await
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    nonempty(text.trim(), &path.display().to_string())
}

/// Runs `command` (with `sh -c`) for a token on its standard output.
async fn token_from_command(command: String) -> anyhow::Result<String> {
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&command)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .map_err(|e| anyhow::anyhow!("cannot run {command:?}: {e}"))?;
    if !out.status.success() {
        anyhow::bail!("{command:?} failed: {}", out.status);
    }
    nonempty(String::from_utf8_lossy(&out.stdout).trim(), &command)
}

fn nonempty(token: &str, source: &str) -> anyhow::Result<String> {
    anyhow::ensure!(!token.is_empty(), "no token in {source}");
    Ok(token.to_owned())
}

/// The credentials the options ask for.
fn credentials(args: &Args) -> Credentials {
    if let Some(t) = &args.token {
        Credentials::Bearer(t.clone())
    } else if let Some(path) = &args.token_file {
        let path = path.clone();
        Credentials::provider(move || token_from_file(path.clone()))
    } else if let Some(command) = &args.token_command {
        let command = command.clone();
        Credentials::provider(move || token_from_command(command.clone()))
    } else {
        Credentials::dev_user(args.user.clone())
    }
}

/// Terminal output: coloured on a terminal, plain otherwise.
struct Ui {
    color: bool,
    prompt: String,
}

impl Ui {
    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    /// Prints a line above the prompt, then the prompt again.
    fn say(&self, line: &str) {
        let mut out = std::io::stdout().lock();
        let clear = if self.color { "\r\x1b[K" } else { "" };
        let _ = write!(out, "{clear}{line}\n{}", self.prompt());
        let _ = out.flush();
    }

    fn prompt(&self) -> String {
        self.paint("1", &self.prompt)
    }

    // Every line shown goes through `escape`: its text carries what other
    // users chose (a caller's message, error messages), and a control
    // character in it could clear the screen, set the window title or
    // forge a status line. Only our own colours are written raw.
    fn info(&self, text: &str) {
        self.say(&format!("  {}", escape(text)));
    }
    fn good(&self, text: &str) {
        self.say(&format!("  {}", self.paint("32", &escape(text))));
    }
    fn ring(&self, text: &str) {
        self.say(&format!("  {}", self.paint("1;33", &escape(text))));
    }
    fn bad(&self, text: &str) {
        self.say(&format!("  {}", self.paint("31", &escape(text))));
    }
}

/// What this phone is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    Idle,
    Calling(String),
    Ringing(String),
    Talking { peer: String, room: u32 },
}

struct Phone {
    client: Client,
    ui: Ui,
    state: State,
}

/// A reason in words, with its code.
fn reason(code: Code) -> String {
    match code.describe() {
        Some(words) => format!("{words} ({})", code.0),
        None => format!("code {} from the business service", code.0),
    }
}

const HELP: &str = "commands:
    call USER [MESSAGE]   dial USER (MESSAGE is shown on their phone)
    answer                accept the incoming call
    reject                decline the incoming call
    hangup                end the call (or stop calling)
    state                 what this phone is doing
    help                  this text
    quit                  leave";

impl Phone {
    /// Runs one command line; false to quit.
    async fn command(&mut self, line: &str) -> bool {
        let mut words = line.split_whitespace();
        let Some(cmd) = words.next() else {
            self.ui.say("");
            return true;
        };
        let rest: Vec<&str> = words.collect();
        let result = match cmd {
            "call" | "dial" => match rest.split_first() {
                Some((peer, message)) => {
                    let peer = (*peer).to_owned();
                    let msg = message.join(" ");
                    let r = self
                        .client
                        .request(&peer, flags::AUDIO | flags::VIDEO, 0, &msg)
                        .await;
                    r.inspect(|code| {
                        if code.is_ok() {
                            self.state = State::Calling(peer.clone());
                            self.ui.info(&format!("calling {peer} ..."));
                        }
                    })
                }
                None => {
                    self.ui.bad("call whom? try: call bob");
                    return true;
                }
            },
            "answer" | "accept" => match &self.state {
                State::Ringing(peer) => self.client.reply(&peer.clone(), Code::OK).await,
                _ => {
                    self.ui.bad("nobody is calling");
                    return true;
                }
            },
            "reject" | "decline" => match &self.state {
                State::Ringing(peer) => self.client.reply(&peer.clone(), Code::REJECTED).await,
                _ => {
                    self.ui.bad("nobody is calling");
                    return true;
                }
            },
            "hangup" | "hang" | "bye" => match &self.state {
                State::Calling(peer) | State::Ringing(peer) | State::Talking { peer, .. } => {
                    self.client.finish(&peer.clone()).await
                }
                State::Idle => {
                    self.ui.bad("no call to hang up");
                    return true;
                }
            },
            "state" | "status" => {
                let text = match &self.state {
                    State::Idle => "idle".to_owned(),
                    State::Calling(p) => format!("calling {p}, waiting for an answer"),
                    State::Ringing(p) => format!("{p} is calling you"),
                    State::Talking { peer, room } => format!("talking with {peer} in room {room}"),
                };
                self.ui.info(&text);
                return true;
            }
            "help" | "?" => {
                self.ui.say(HELP);
                return true;
            }
            "quit" | "exit" => return false,
            other => {
                self.ui
                    .bad(&format!("unknown command {other:?}; type 'help'"));
                return true;
            }
        };
        match result {
            Ok(code) if code.is_ok() => {}
            Ok(code) => self.ui.bad(&format!("refused: {}", reason(code))),
            Err(e) => self.ui.bad(&format!("{e}")),
        }
        true
    }

    fn event(&mut self, e: CallEvent) {
        let peer = e.peer.clone();
        match e.kind {
            EventKind::Request => {
                self.state = State::Ringing(peer.clone());
                let msg = if e.user_str.is_empty() {
                    String::new()
                } else {
                    format!(": \"{}\"", e.user_str)
                };
                self.ui.ring(&format!(
                    "☎  {peer} is calling{msg} — type 'answer' or 'reject'"
                ));
            }
            EventKind::Reply if e.code.is_ok() => self.ui.good(&format!("{peer} answered")),
            EventKind::Reply => {
                self.state = State::Idle;
                self.ui.bad(&format!(
                    "call to {peer} did not go through: {}",
                    reason(e.code)
                ));
            }
            EventKind::Start => {
                self.state = State::Talking {
                    peer: peer.clone(),
                    room: e.param,
                };
                self.ui
                    .good(&format!("● call started with {peer} — room {}", e.param));
            }
            EventKind::Finish => {
                self.state = State::Idle;
                if e.code.is_ok() {
                    self.ui.info(&format!("■ call with {peer} ended: hung up"));
                } else {
                    self.ui
                        .bad(&format!("■ call with {peer} ended: {}", reason(e.code)));
                }
            }
        }
    }
}

async fn run(args: Args, ui: Ui) -> anyhow::Result<()> {
    let credentials = credentials(&args);
    let (client, mut events): (Client, Events) = Client::connect(args.url.clone(), credentials)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", args.url))?;
    ui.say(&format!(
        "{} connected to {} as {} (device {}). Type 'help' for commands.",
        ui.paint("1;36", "phone"),
        args.url,
        client.user_id(),
        client.connection_id()
    ));
    let mut phone = Phone {
        client,
        ui,
        state: State::Idle,
    };
    let mut input = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = input.next_line() => match line {
                Ok(Some(line)) => {
                    if !phone.command(line.trim()).await {
                        break;
                    }
                }
                // End of input (Ctrl-D) or an unreadable terminal.
                _ => break,
            },
            event = events.next() => match event {
                Some(e) => phone.event(e),
                None => anyhow::bail!("the call service closed the connection"),
            },
        }
    }
    println!();
    Ok(())
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let color = std::io::stdout().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let ui = Ui {
        color,
        prompt: format!("{}> ", args.user),
    };
    if let Err(e) = run(
        args,
        Ui {
            color,
            prompt: ui.prompt.clone(),
        },
    )
    .await
    {
        // A sentence, not a stack trace.
        eprintln!("\n{}", ui.paint("31", &format!("phone: {e}")));
        std::process::exit(1);
    }
}
