//! The gRPC transport: the `dlm.v1.Dlm` service. One task per session
//! stream reads the client's requests and hands them to the driver; the
//! driver writes back through the session's bounded queue. The admin calls
//! are one command each.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;

use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status, Streaming};

use crate::access::{Access, Identity};
use crate::bounds::SHUTDOWN_ANSWER_TIMEOUT;
use crate::codes::{RejectCode, Right};
use crate::command::{
    Command, Credentials, DriverHandle, DriverStopped, OpenError, OpenSession, SessionOutput, SessionSender,
};
use crate::convert::Rejection;
use crate::proto;
use crate::transport::tls::TcpClient;

/// The `dlm.v1.Dlm` service.
pub struct DlmService {
    driver: DriverHandle,
    node: String,
    session_queue_max: usize,
    access: Arc<Access>,
}

impl DlmService {
    /// A service that forwards to `driver`, its admin calls and dumps
    /// checked against `access` (lock requests are checked by the driver).
    #[must_use]
    pub fn new(driver: DriverHandle, node: String, session_queue_max: usize, access: Arc<Access>) -> DlmService {
        DlmService { driver, node, session_queue_max, access }
    }

    /// `Ok` if the caller of `request` has `right` in `lockspace`.
    fn check<T>(&self, request: &Request<T>, right: Right, lockspace: &str) -> Result<(), Status> {
        let who = credentials_of(request).identity;
        self.access
            .check(&who, right, lockspace)
            .map_err(|message| crate::convert::rejection_status(RejectCode::PermissionDenied.as_str(), &message))
    }
}

fn unavailable(_: DriverStopped) -> Status {
    Status::unavailable("the agent is shutting down")
}

fn rejected(rejection: Rejection) -> Status {
    crate::convert::rejection_status(rejection.code.as_str(), &rejection.message)
}

/// The client's credentials: from the Unix socket (SO_PEERCRED), or the
/// certificate a TCP client presented; none for a TCP client without one.
fn credentials_of<T>(request: &Request<T>) -> Credentials {
    let extensions = request.extensions();
    if let Some(tcp) = extensions.get::<TcpClient>() {
        let identity = Identity { certificate: tcp.certificate.clone(), ..Identity::default() };
        return Credentials { pid: None, identity };
    }
    extensions.get::<UdsConnectInfo>().and_then(|info| info.peer_cred).map(Credentials::of).unwrap_or_default()
}

/// Answers what a stopping agent's client still sends, then lets the
/// stream end.
async fn answer_while_stopping(inbound: &mut Streaming<proto::ClientMessage>, answers: &SessionSender) {
    let until = tokio::time::Instant::now() + SHUTDOWN_ANSWER_TIMEOUT;
    while let Ok(Ok(Some(message))) = tokio::time::timeout_at(until, inbound.message()).await {
        let handle = crate::convert::handle_of(&message);
        if answers.try_send(Ok(crate::convert::shutting_down(handle))).is_err() {
            return;
        }
    }
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<proto::ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl proto::dlm_server::Dlm for DlmService {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<proto::ClientMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        let credentials = credentials_of(&request);
        let mut inbound = request.into_inner();
        let (events, outbound) = mpsc::channel(self.session_queue_max);
        // Kept to end the stream with a status that says what the client did
        // wrong, rather than OK, when its messages stop making sense.
        let refusal = events.clone();
        let output = SessionOutput::Stream(events);
        let OpenSession { session, ended: mut session_ended } =
            self.driver.open_session(credentials, &self.node, output).await.map_err(|error| match error {
                OpenError::Stopped => unavailable(DriverStopped),
                OpenError::Refused(rejection) => rejected(rejection),
            })?;
        let driver = self.driver.clone();
        tokio::spawn(async move {
            // Ends on a clean close, a broken connection (the client died, a
            // keepalive went unanswered), a frame that does not decode, or
            // the driver ending the session (slow reader, shutdown).
            loop {
                let message = tokio::select! {
                    message = inbound.message() => message,
                    _ = &mut session_ended => {
                        if driver.is_stopped() {
                            answer_while_stopping(&mut inbound, &refusal).await;
                        }
                        return;
                    }
                };
                match message {
                    Ok(Some(message)) => {
                        let handle = crate::convert::handle_of(&message);
                        if driver.send(Command::Client { session, message }).await.is_err() {
                            // The driver stopped between two messages: this
                            // one, and any after it, are answered here.
                            let _ = refusal.try_send(Ok(crate::convert::shutting_down(handle)));
                            answer_while_stopping(&mut inbound, &refusal).await;
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(session = session.0, %status, "session stream failed");
                        // A message that does not decode (or a broken stream,
                        // which nobody hears of): the session ends with an
                        // error status, not OK.
                        let why = format!("the session's requests could not be read: {}", status.message());
                        let _ = refusal.try_send(Err(Status::invalid_argument(why)));
                        break;
                    }
                }
            }
            let _ = driver.send(Command::Close { session }).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(outbound))))
    }

    async fn status(&self, _: Request<proto::StatusRequest>) -> Result<Response<proto::StatusReply>, Status> {
        let reply = self.driver.ask(|reply| Command::Status { reply }).await.map_err(unavailable)?;
        Ok(Response::new(reply))
    }

    async fn lockspaces(
        &self,
        _: Request<proto::LockspacesRequest>,
    ) -> Result<Response<proto::LockspacesReply>, Status> {
        let reply = self.driver.ask(|reply| Command::Lockspaces { reply }).await.map_err(unavailable)?;
        Ok(Response::new(reply))
    }

    async fn dump(&self, request: Request<proto::DumpRequest>) -> Result<Response<proto::DumpReply>, Status> {
        self.check(&request, Right::Dump, &request.get_ref().lockspace)?;
        let request = request.into_inner();
        let reply = self.driver.ask(|reply| Command::Dump { request, reply }).await.map_err(unavailable)?;
        reply.map(Response::new).map_err(rejected)
    }

    async fn create_lockspace(
        &self,
        request: Request<proto::CreateLockspaceRequest>,
    ) -> Result<Response<proto::CreateLockspaceReply>, Status> {
        self.check(&request, Right::Admin, "")?;
        let request = request.into_inner();
        let lvb_len = request.lvb_len as usize;
        let name = request.name;
        let reply =
            self.driver.ask(|reply| Command::CreateLockspace { name, lvb_len, reply }).await.map_err(unavailable)?;
        reply.map(|()| Response::new(proto::CreateLockspaceReply {})).map_err(rejected)
    }

    async fn release_lockspace(
        &self,
        request: Request<proto::ReleaseLockspaceRequest>,
    ) -> Result<Response<proto::ReleaseLockspaceReply>, Status> {
        self.check(&request, Right::Admin, "")?;
        let request = request.into_inner();
        let (name, force) = (request.name, request.force);
        let reply =
            self.driver.ask(|reply| Command::ReleaseLockspace { name, force, reply }).await.map_err(unavailable)?;
        reply.map(|()| Response::new(proto::ReleaseLockspaceReply {})).map_err(rejected)
    }

    async fn fence_ack(
        &self,
        request: Request<proto::FenceAckRequest>,
    ) -> Result<Response<proto::FenceAckReply>, Status> {
        self.check(&request, Right::Admin, "")?;
        let node = u16::try_from(request.into_inner().node_id)
            .map_err(|_| Status::invalid_argument("node ids are 0 to 65535"))?;
        let node = dlm_core::cluster::NodeId(node);
        let reply = self.driver.ask(|reply| Command::FenceAck { node, reply }).await.map_err(unavailable)?;
        reply.map(|()| Response::new(proto::FenceAckReply {})).map_err(Status::failed_precondition)
    }
}
