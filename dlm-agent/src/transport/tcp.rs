//! The client API's TCP listener: gRPC only. Each connection is admitted
//! by its remote address ([`super::admission`]) and must send its HTTP/2
//! preface and SETTINGS within the handshake timeout; then it is tonic's.

use std::io;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::admission::{Admission, Key};
use super::preface::{Replayed, read_http2_start};

/// Gives tonic its TCP connections.
pub type TcpIncoming = ReceiverStream<io::Result<Replayed<TcpStream>>>;

/// Accepts on `listener` for as long as tonic takes connections.
pub fn spawn(listener: TcpListener, admission: Admission) -> TcpIncoming {
    let (grpc, incoming) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                // tonic stopped serving: so does the listener.
                () = grpc.closed() => return,
            };
            let (mut stream, address) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors, mostly: wait rather than spin.
                    tracing::warn!(%error, "accepting on the TCP client listener failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some((open, handshake)) = admission.admit(Key::Address(address.ip())) else { continue };
            let (grpc, deadline) = (grpc.clone(), admission.handshake_timeout);
            tokio::spawn(async move {
                let start = async {
                    let mut first = [0u8];
                    tokio::io::AsyncReadExt::read_exact(&mut stream, &mut first).await?;
                    read_http2_start(&mut stream, first[0]).await
                };
                let start = tokio::time::timeout(deadline, start).await;
                drop(handshake);
                match start {
                    Ok(Ok(start)) => {
                        let _ = grpc.send(Ok(Replayed::new(start, stream, open))).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%address, %error, "TCP client closed: not an HTTP/2 start"),
                    Err(_) => tracing::debug!(%address, "TCP client silent past the handshake timeout closed"),
                }
            });
        }
    });
    ReceiverStream::new(incoming)
}
