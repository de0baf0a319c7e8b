//! Answers a Unix socket connection that a quota refused
//! ([`super::admission`]), so that a client over a limit hears which limit
//! and how to raise it at once, rather than seeing its connection closed
//! (or, worse, its stream wait for ever):
//!
//! - a framed session gets a `Rejected` message (`limit_exceeded`) where
//!   its `Welcome` would be, as a session refused by the session quota does;
//! - a gRPC connection is served by a tonic server of its own whose every
//!   call fails with `RESOURCE_EXHAUSTED` and the same message.
//!
//! Answering costs a slot of [`Admission::answering`](super::admission::Admission)
//! (a few, per client too); without one the connection is closed at once.
//! Either way the connection lives at most [`ANSWER_LIFETIME`].

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::time::Sleep;
use tokio_stream::wrappers::ReceiverStream;
use tonic::server::NamedService;
use tonic::transport::server::Connected;

use super::admission::Refused;
use super::authority::AuthorityFixed;
use super::preface::Replayed;

use crate::codes::RejectCode;
use crate::framing::{FrameSink, FramedWrite};
use crate::proto;

/// The longest a refused connection is kept to be answered.
pub const ANSWER_LIFETIME: Duration = Duration::from_secs(2);

/// A refused gRPC connection, handed to the refusing server.
pub type RefusedGrpc = Expiring<Replayed<AuthorityFixed<UnixStream>>>;

/// The refusing gRPC server's connections, and the task serving them until
/// `stop`.
pub fn spawn_grpc(
    stop: impl Future<Output = ()> + Send + 'static,
) -> (mpsc::Sender<io::Result<RefusedGrpc>>, tokio::task::JoinHandle<()>) {
    let (connections, incoming) = mpsc::channel(16);
    let task = tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(Refuse)
            .serve_with_incoming_shutdown(ReceiverStream::new(incoming), stop)
            .await;
        if let Err(error) = served {
            tracing::warn!(%error, "the server that answers refused gRPC connections stopped");
        }
    });
    (connections, task)
}

/// Tells a refused framed session why, where its welcome would be.
pub async fn answer_framed(write: FramedWrite, refused: &Refused) {
    let sink = FrameSink::new(write);
    let refusal = proto::ServerMessage {
        body: Some(proto::server_message::Body::Rejected(proto::Rejected {
            handle: 0,
            code: RejectCode::LimitExceeded.as_str().into(),
            message: refused.message.clone(),
        })),
    };
    if sink.send_message(&refusal).is_ok() {
        let _ = tokio::time::timeout(ANSWER_LIFETIME, sink.room(0)).await;
    }
}

/// Why a connection was refused: what the refusing server tells each call.
#[derive(Clone, Debug)]
pub struct RefusalInfo(Arc<str>);

/// A refused connection that ends (reads end of file) after
/// [`ANSWER_LIFETIME`], so a client that keeps it open does not keep its
/// answering slot.
pub struct Expiring<S> {
    stream: S,
    expiry: Pin<Box<Sleep>>,
    why: RefusalInfo,
}

impl<S> Expiring<S> {
    /// `stream` (which holds its answering slot), refused for `message`.
    #[must_use]
    pub fn new(stream: S, message: &str) -> Expiring<S> {
        Expiring { stream, expiry: Box::pin(tokio::time::sleep(ANSWER_LIFETIME)), why: RefusalInfo(message.into()) }
    }
}

impl<S> Connected for Expiring<S> {
    type ConnectInfo = RefusalInfo;

    fn connect_info(&self) -> RefusalInfo {
        self.why.clone()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Expiring<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.expiry.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Expiring<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The refusing service: every call of `dlm.v1.Dlm` fails with
/// `RESOURCE_EXHAUSTED` and the connection's refusal.
#[derive(Clone, Copy, Debug)]
struct Refuse;

impl NamedService for Refuse {
    const NAME: &'static str = "dlm.v1.Dlm";
}

impl<B> tower::Service<http::Request<B>> for Refuse {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let why = request.extensions().get::<RefusalInfo>().map_or("a limit of the agent", |info| &info.0);
        let status = crate::convert::rejection_status(RejectCode::LimitExceeded.as_str(), why);
        std::future::ready(Ok(status.into_http()))
    }
}
