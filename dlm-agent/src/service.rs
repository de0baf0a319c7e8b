//! The gRPC service: one task per session stream reads the client's
//! requests and hands them to the engine; the engine writes back through the
//! session's bounded queue.

use std::pin::Pin;

use tokio::sync::mpsc;

use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status, Streaming};

use crate::convert::Rejection;
use crate::engine::{Command, EngineHandle, EngineStopped, OpenError, OpenSession, Peer, SessionOutput};
use crate::proto;

/// The `dlm.v1.Dlm` service.
pub struct DlmService {
    engine: EngineHandle,
    node: String,
    session_queue_max: usize,
}

impl DlmService {
    /// A service that forwards to `engine`.
    #[must_use]
    pub fn new(engine: EngineHandle, node: String, session_queue_max: usize) -> DlmService {
        DlmService { engine, node, session_queue_max }
    }
}

fn unavailable(_: EngineStopped) -> Status {
    Status::unavailable("the agent is shutting down")
}

fn rejected(rejection: Rejection) -> Status {
    crate::convert::rejection_status(rejection.code, &rejection.message)
}

/// The client's credentials, from the Unix socket (SO_PEERCRED); TCP
/// clients have none.
fn peer_of<T>(request: &Request<T>) -> Peer {
    match request.extensions().get::<UdsConnectInfo>().and_then(|info| info.peer_cred) {
        Some(credentials) => Peer { pid: credentials.pid(), uid: Some(credentials.uid()) },
        None => Peer::default(),
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
        let peer = peer_of(&request);
        let mut inbound = request.into_inner();
        let (events, outbound) = mpsc::channel(self.session_queue_max);
        let output = SessionOutput::Stream(events);
        let OpenSession { session, ended: mut session_ended } =
            self.engine.open_session(peer, &self.node, output).await.map_err(|error| match error {
                OpenError::Stopped => unavailable(EngineStopped),
                OpenError::Refused(rejection) => rejected(rejection),
            })?;
        let engine = self.engine.clone();
        tokio::spawn(async move {
            // Ends on a clean close, a broken connection (the client died, a
            // keepalive went unanswered), a frame that does not decode, or
            // the engine ending the session (slow reader, shutdown).
            loop {
                let message = tokio::select! {
                    message = inbound.message() => message,
                    _ = &mut session_ended => return,
                };
                match message {
                    Ok(Some(message)) => {
                        if engine.send(Command::Client { session, message }).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(session = session.0, %status, "session stream failed");
                        break;
                    }
                }
            }
            let _ = engine.send(Command::Close { session }).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(outbound))))
    }

    async fn status(&self, _: Request<proto::StatusRequest>) -> Result<Response<proto::StatusReply>, Status> {
        let reply = self.engine.ask(|reply| Command::Status { reply }).await.map_err(unavailable)?;
        Ok(Response::new(reply))
    }

    async fn lockspaces(
        &self,
        _: Request<proto::LockspacesRequest>,
    ) -> Result<Response<proto::LockspacesReply>, Status> {
        let reply = self.engine.ask(|reply| Command::Lockspaces { reply }).await.map_err(unavailable)?;
        Ok(Response::new(reply))
    }

    async fn dump(&self, request: Request<proto::DumpRequest>) -> Result<Response<proto::DumpReply>, Status> {
        let request = request.into_inner();
        let reply = self.engine.ask(|reply| Command::Dump { request, reply }).await.map_err(unavailable)?;
        reply.map(Response::new).map_err(rejected)
    }

    async fn create_lockspace(
        &self,
        request: Request<proto::CreateLockspaceRequest>,
    ) -> Result<Response<proto::CreateLockspaceReply>, Status> {
        let request = request.into_inner();
        let lvb_len = request.lvb_len as usize;
        let name = request.name;
        let reply =
            self.engine.ask(|reply| Command::CreateLockspace { name, lvb_len, reply }).await.map_err(unavailable)?;
        reply.map(|()| Response::new(proto::CreateLockspaceReply {})).map_err(rejected)
    }

    async fn release_lockspace(
        &self,
        request: Request<proto::ReleaseLockspaceRequest>,
    ) -> Result<Response<proto::ReleaseLockspaceReply>, Status> {
        let request = request.into_inner();
        let (name, force) = (request.name, request.force);
        let reply =
            self.engine.ask(|reply| Command::ReleaseLockspace { name, force, reply }).await.map_err(unavailable)?;
        reply.map(|()| Response::new(proto::ReleaseLockspaceReply {})).map_err(rejected)
    }
}
