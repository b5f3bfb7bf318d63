//! Unary requests that end with their message.
//!
//! hyper sends a request body's frames as they come and ends the stream
//! with an empty DATA frame once the body says it is done. tonic's request
//! body only says so when polled after its one message, so every unary call
//! costs a third write (and a wake-up of hyper's body task) just to end the
//! stream. [`EndWithMessage`] looks one frame ahead: when the body has
//! nothing after the frame it hands out, it reports its end at once, and
//! hyper marks that DATA frame END_STREAM.

use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use tonic::body::Body as TonicBody;

/// A client service whose requests' bodies end with their last frame.
#[derive(Clone, Debug)]
pub struct EndWithMessage<S>(pub S);

impl<S> tower::Service<http::Request<TonicBody>> for EndWithMessage<S>
where
    S: tower::Service<http::Request<TonicBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<TonicBody>) -> Self::Future {
        self.0
            .call(req.map(|body| TonicBody::new(LookAhead::new(body))))
    }
}

/// A body that polls its inner body once more after each frame.
struct LookAhead<B: Body> {
    inner: B,
    /// What the look-ahead found: the next frame (or error).
    next: Option<Result<Frame<B::Data>, B::Error>>,
    /// The inner body has ended.
    ended: bool,
}

impl<B: Body> LookAhead<B> {
    fn new(inner: B) -> Self {
        Self {
            inner,
            next: None,
            ended: false,
        }
    }
}

impl<B> Body for LookAhead<B>
where
    B: Body + Unpin,
    B::Data: Unpin,
    B::Error: Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let frame = match this.next.take() {
            Some(frame) => frame,
            None if this.ended => return Poll::Ready(None),
            None => match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    this.ended = true;
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(frame)) => frame,
            },
        };
        if frame.is_ok() && !this.ended {
            // A Pending here leaves the waker registered; the frame goes out
            // now either way.
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => {}
                Poll::Ready(None) => this.ended = true,
                Poll::Ready(Some(next)) => this.next = Some(next),
            }
        }
        Poll::Ready(Some(frame))
    }

    fn is_end_stream(&self) -> bool {
        self.next.is_none() && (self.ended || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        // With a frame held back, the inner body's hint leaves it out.
        match self.next {
            Some(_) => SizeHint::default(),
            None => self.inner.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tonic::Status;

    fn frames(parts: &[&'static str]) -> TonicBody {
        let frames = parts
            .iter()
            .map(|p| Ok::<_, Status>(Frame::data(bytes::Bytes::from_static(p.as_bytes()))))
            .collect::<Vec<_>>();
        TonicBody::new(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )))
    }

    #[tokio::test]
    async fn a_one_message_body_ends_with_its_message() {
        let mut body = LookAhead::new(frames(&["hello"]));
        assert!(!body.is_end_stream());
        let frame = body.frame().await.expect("a frame").expect("data");
        assert_eq!(frame.into_data().ok().as_deref(), Some(&b"hello"[..]));
        assert!(body.is_end_stream(), "ended with its only frame");
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn every_frame_comes_out_in_order_and_the_end_shows_with_the_last() {
        let mut body = LookAhead::new(frames(&["a", "b", "c"]));
        let mut seen = Vec::new();
        while let Some(frame) = body.frame().await {
            let data = frame.expect("data").into_data().expect("data frame");
            seen.push(String::from_utf8(data.to_vec()).expect("utf-8"));
            assert_eq!(body.is_end_stream(), seen.len() == 3, "after {seen:?}");
        }
        assert_eq!(seen, ["a", "b", "c"]);
    }

    #[tokio::test]
    async fn an_empty_body_ends_at_once() {
        let mut body = LookAhead::new(frames(&[]));
        assert!(body.frame().await.is_none());
        assert!(body.is_end_stream());
    }
}
