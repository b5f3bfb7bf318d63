//! What a device's stream carries, as domain values. The switchboard queues
//! these; the device's own response stream encodes them to protobuf
//! ([`crate::convert::server_message`]), so encoding runs on the tasks of
//! the streams rather than on the switchboard's one core.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::domain::{CallId, ConnId, Event, UserId};

/// One message for a device.
#[derive(Clone, Debug, PartialEq)]
pub enum Outgoing {
    /// The first message of every stream.
    Connected {
        user: UserId,
        conn: ConnId,
        resume_token: Arc<str>,
        resumed: bool,
    },
    /// The answer to the control with this `seq`.
    Result {
        seq: u64,
        code: u32,
        call_id: Option<CallId>,
        reason: &'static str,
    },
    /// A call event.
    Event(Event),
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
