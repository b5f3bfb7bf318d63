//! Maximum call duration: when a call has been talking for the policy's
//! `max_call_duration`, the business service ends it with a forced FINISH
//! (code `codes.max_duration`) through the call service's admin API.
//!
//! One task owns the timers (a `DelayQueue`): START arms one, FINISH (or a
//! failed REPLY) disarms it. The forced FINISH names the call id, so a late
//! timer can never end a newer call of the same user. Commands wait in a
//! bounded queue of [`QUEUE`]; when it is full the command is dropped and
//! logged (that call is then not limited).

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::time::{DelayQueue, delay_queue};
use tonic::transport::Channel;
use tracing::{info, warn};
use videocall_proto::v1 as pb;
use videocall_proto::v1::call_admin_client::CallAdminClient;

use crate::admin::AdminAccess;
use crate::metrics::{Metrics, ResultLabel};
use crate::policy::Policy;

const QUEUE: usize = 4096;

#[derive(Debug)]
enum Command {
    Arm {
        call_id: String,
        user: String,
        after: Duration,
        code: u32,
    },
    Disarm {
        call_id: String,
    },
}

/// Handle to the enforcer task. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Enforcer {
    tx: mpsc::Sender<Command>,
}

impl Enforcer {
    /// Starts the enforcer, talking to the admin API at `admin_url` with
    /// `access` (connected lazily, so the call service may start later).
    pub fn start(
        admin_url: &str,
        access: AdminAccess,
        metrics: Metrics,
        tasks: &TaskTracker,
        token: CancellationToken,
    ) -> Result<Self, tonic::transport::Error> {
        let channel = access.endpoint(admin_url)?.connect_lazy();
        let (tx, rx) = mpsc::channel(QUEUE);
        let admin = (CallAdminClient::new(channel), access);
        tasks.spawn(run(admin, rx, metrics, tasks.clone(), token));
        Ok(Self { tx })
    }

    /// Looks at a call event: START arms a timer (if the policy has a
    /// maximum), the end of a call disarms it.
    pub fn observe(&self, n: &pb::CallEventNotice, policy: &Policy) {
        let cmd = match pb::EventType::try_from(n.event_type) {
            Ok(pb::EventType::Start) => match policy.max_call_duration {
                Some(after) => Command::Arm {
                    call_id: n.call_id.clone(),
                    user: n.caller_user_id.clone(),
                    after,
                    code: policy.codes.max_duration,
                },
                None => return,
            },
            Ok(pb::EventType::Finish) => Command::Disarm {
                call_id: n.call_id.clone(),
            },
            _ => return,
        };
        if let Err(e) = self.tx.try_send(cmd) {
            warn!(call_id = %n.call_id, error = %e, "duration enforcer queue full: command dropped");
        }
    }
}

async fn run(
    (client, access): (CallAdminClient<Channel>, AdminAccess),
    mut rx: mpsc::Receiver<Command>,
    metrics: Metrics,
    tasks: TaskTracker,
    token: CancellationToken,
) {
    let mut timers: DelayQueue<(String, String, u32)> = DelayQueue::new();
    let mut keys: HashMap<String, delay_queue::Key> = HashMap::new();
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            cmd = rx.recv() => match cmd {
                None => return,
                Some(Command::Arm { call_id, user, after, code }) => {
                    // A redelivered START must not arm a second timer.
                    if let std::collections::hash_map::Entry::Vacant(slot) = keys.entry(call_id) {
                        let key = timers.insert((slot.key().clone(), user, code), after);
                        slot.insert(key);
                    }
                }
                Some(Command::Disarm { call_id }) => {
                    if let Some(key) = keys.remove(&call_id) {
                        timers.remove(&key);
                    }
                }
            },
            Some(expired) = std::future::poll_fn(|cx| timers.poll_expired(cx)), if !timers.is_empty() => {
                let (call_id, user, code) = expired.into_inner();
                keys.remove(&call_id);
                let mut client = client.clone();
                let access = access.clone();
                let token = token.clone();
                let metrics = metrics.clone();
                tasks.spawn(async move {
                    let request = pb::AdminControl {
                        event_type: pb::EventType::Finish as i32,
                        user_id: user.clone(),
                        error_code: code,
                        user_str: "maximum call duration reached".into(),
                        call_id: call_id.clone(),
                        ..Default::default()
                    };
                    let mut request = tonic::Request::new(request);
                    access.authorize(&mut request);
                    tokio::select! {
                        () = token.cancelled() => {}
                        r = client.video_call_control(request) => match r {
                            Ok(r) => {
                                let result = r.into_inner().code;
                                metrics.forced_finishes.get_or_create(&ResultLabel { result }).inc();
                                info!(%call_id, %user, code, result, "maximum call duration: forced FINISH");
                            }
                            Err(e) => warn!(%call_id, %user, error = %e.message(), "maximum call duration: forced FINISH failed"),
                        }
                    }
                });
            }
        }
    }
}
