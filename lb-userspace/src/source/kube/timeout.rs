//! The API client's request bounds: every answer must begin within [`ApiTimeout`] and a list
//! must be complete within it (kube-rs sets no read timeout); each answer, or its failure, is
//! recorded in [`SourceHealth`] for the kind it was for.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use futures::FutureExt as _;

use super::{SourceHealth, Watched};

/// How long the API server may take: to begin answering any request, and to deliver a whole
/// list. A watch, once answered, may stay quiet as long as it likes (the watcher has its own
/// idle timeout past the server-side one). It also ends the kube client's own retries of
/// 429, 503 and 504 (which wait out `Retry-After`, up to 15 times): the watcher sees no error
/// while they go on, so without this a throttled server would not be reported stale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiTimeout(pub Duration);

impl ApiTimeout {
    pub const DEFAULT: Self = Self(Duration::from_secs(60));
}

impl Default for ApiTimeout {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A request that ran past its [`ApiTimeout`].
#[derive(Debug, thiserror::Error)]
pub enum TimedOut {
    #[error("the API server did not answer within {0:?}")]
    Answer(Duration),
    #[error("the API server's list was not complete within {0:?}")]
    List(Duration),
}

/// See [`SourceHealth::layer`].
#[derive(Clone, Debug)]
pub struct HealthLayer {
    pub(super) health: SourceHealth,
    pub(super) timeout: ApiTimeout,
}

impl<S> tower::Layer<S> for HealthLayer {
    type Service = HealthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HealthService {
            inner,
            health: self.health.clone(),
            timeout: self.timeout,
        }
    }
}

/// The service [`HealthLayer`] wraps around the API client's.
#[derive(Clone, Debug)]
pub struct HealthService<S> {
    inner: S,
    health: SourceHealth,
    timeout: ApiTimeout,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for HealthService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + 'static,
    ResBody: http_body::Body<Data = bytes::Bytes> + Unpin + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = http::Response<DeadlineBody<ResBody>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let kind = Watched::of_path(request.uri().path());
        let watch = is_watch(request.uri().query().unwrap_or_default());
        let health = self.health.clone();
        let ApiTimeout(timeout) = self.timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let answer = self.inner.call(request);
        async move {
            let response = tokio::time::timeout_at(deadline, answer)
                .await
                .map_err(|_| TimedOut::Answer(timeout))?
                .map_err(Into::into)?;
            if watch {
                if let Some(kind) = kind
                    && response.status().is_success()
                {
                    health.record_success(kind);
                }
                return Ok(response.map(DeadlineBody::unbounded));
            }
            Ok(response.map(|body| DeadlineBody::until(body, deadline, timeout)))
        }
        .boxed()
    }
}

/// Whether a request's query asks for a watch (`watch=true`, or `watch=1`).
fn is_watch(query: &str) -> bool {
    query
        .split('&')
        .any(|pair| matches!(pair, "watch=true" | "watch=1"))
}

/// A response body that fails once its deadline has passed: a list that trickles in more
/// slowly than [`ApiTimeout`] is an error, not a hang. Hand-rolled: tower-http's body
/// timeout limits the gap between frames, not the whole body.
pub struct DeadlineBody<B> {
    inner: B,
    deadline: Option<(Pin<Box<tokio::time::Sleep>>, Duration)>,
}

impl<B> DeadlineBody<B> {
    fn unbounded(inner: B) -> Self {
        Self {
            inner,
            deadline: None,
        }
    }

    fn until(inner: B, deadline: tokio::time::Instant, timeout: Duration) -> Self {
        Self {
            inner,
            deadline: Some((Box::pin(tokio::time::sleep_until(deadline)), timeout)),
        }
    }
}

impl<B> http_body::Body for DeadlineBody<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if let Some((sleep, timeout)) = &mut self.deadline
            && sleep.as_mut().poll(cx).is_ready()
        {
            let timeout = *timeout;
            return Poll::Ready(Some(Err(TimedOut::List(timeout).into())));
        }
        Pin::new(&mut self.inner)
            .poll_frame(cx)
            .map(|frame| frame.map(|frame| frame.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::is_watch;

    #[test]
    fn watch_requests_are_told_from_lists() {
        assert!(is_watch("labelSelector=a&watch=true&resourceVersion=5"));
        assert!(is_watch("watch=1"));
        assert!(!is_watch("labelSelector=a&limit=500"));
        assert!(!is_watch("watch=false"));
        assert!(!is_watch(""));
    }
}
