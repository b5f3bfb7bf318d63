//! What a device's stream carries, as domain values. The switchboard queues
//! these; the device's own response stream encodes them to protobuf
//! ([`crate::convert::server_message`]), so encoding runs on the tasks of
//! the streams rather than on the switchboard's one core.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::domain::{CallId, ConnId, Event, UserId};

/// One message for a device.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Outgoing {
    /// The first message of every stream.
    Connected {
        user: UserId,
        conn: ConnId,
        resume_token: Arc<str>,
        resumed: bool,
        /// How many results are among the parked messages that follow (a
        /// resumed device's): the edge puts its own answers after them.
        #[serde(default)]
        parked_results: u32,
    },
    /// The answer to the control with this `seq`.
    Result {
        seq: u64,
        code: u32,
        call_id: Option<CallId>,
        reason: Reason,
    },
    /// A call event.
    Event(Event),
}

/// A result's reason: one of the rules' own literals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reason(pub &'static str);

impl serde::Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0)
    }
}

/// Read back from a shared store: the reasons are the rules' few literals,
/// so each distinct text is kept once for the life of the process (the set
/// stays as small as the list of reasons).
impl<'de> serde::Deserialize<'de> for Reason {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use std::collections::HashSet;
        use std::sync::{Mutex, OnceLock};
        static SEEN: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
        let text = <String as serde::Deserialize>::deserialize(d)?;
        let mut seen = SEEN
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(s) = seen.get(text.as_str()) {
            return Ok(Reason(s));
        }
        let s: &'static str = Box::leak(text.into_boxed_str());
        seen.insert(s);
        Ok(Reason(s))
    }
}

impl Outgoing {
    /// Whether this answers a control (the stream counts them, to keep its
    /// own answers in order with the switchboard's).
    pub fn is_result(&self) -> bool {
        matches!(self, Outgoing::Result { .. })
    }
}

/// The receiving half of a device's outgoing queue: what its gRPC response
/// stream reads. Messages are boxed: a channel allocates its first block of
/// 32 slots up front, and a slot of the unboxed message made that block a
/// large share of an idle device's memory.
pub type DeviceRx = mpsc::Receiver<Box<Outgoing>>;
/// The sending half, held by the switchboard.
pub type DeviceTx = mpsc::Sender<Box<Outgoing>>;
