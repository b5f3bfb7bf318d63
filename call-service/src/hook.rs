//! What the call rules need of the business service, as a trait: the
//! switchboard depends on this, not on the gRPC client behind it
//! ([`crate::business::Business`] implements it), so the rules' owner can be
//! tested with a hook of the test's own and the client changed without it.

use futures_util::future::BoxFuture;

use crate::domain::{Notice, UserId, Verdict};

/// The business hook as the switchboard sees it.
pub trait Hook: Send + Sync + 'static {
    /// Asks whether a call may proceed. The future resolves within the
    /// hook's own deadline (a failure is a verdict too), so the switchboard
    /// may poll it without a timer of its own.
    fn approve(&self, notice: Notice) -> BoxFuture<'static, Verdict>;
    /// Reports an event without waiting; delivery is the hook's business.
    fn notify(&self, notice: Notice);
    /// Whether `caller` has as many notices waiting as it may: its next
    /// REQUEST is refused OVERLOADED until they drain.
    fn caller_over_quota(&self, caller: &UserId) -> bool;
    /// Whether its notice queues are over half full: a source of notices
    /// that can wait (a cluster's notice lanes, durable in Redis) holds
    /// off rather than have notices dropped.
    fn busy(&self) -> bool;
    /// No more notices will come: deliver what is held, then stop.
    fn close(&self);
}
