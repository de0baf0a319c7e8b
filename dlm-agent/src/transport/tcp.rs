//! The client API's TCP listener: gRPC only, over TLS unless `[tls]
//! insecure = true`. Each connection is admitted by its remote address
//! ([`super::admission`]), must finish its TLS handshake and send its
//! HTTP/2 preface and SETTINGS within the handshake timeout; then it is
//! tonic's. The certificate a client presented (if any) goes with each of
//! its requests ([`TcpClient`]): it is the client's identity for the access
//! policy.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use super::admission::{Admission, Key, Turns};
use super::preface::{Replayed, read_http2_start};
use super::tls::{TcpClient, Tls};

/// A TCP client's connection: TLS, or plain when insecure.
pub enum ClientStream {
    /// `insecure = true`.
    Plain(TcpStream),
    /// TLS, with the client's certificate if it gave one.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, TcpClient),
}

/// Gives tonic its TCP connections.
pub type TcpIncoming = ReceiverStream<io::Result<Replayed<ClientStream>>>;

/// Accepts on `listener` for as long as tonic takes connections.
pub fn spawn(listener: TcpListener, admission: Admission, tls: Option<Arc<Tls>>) -> TcpIncoming {
    let (grpc, incoming) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut turns = Turns::default();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                // tonic stopped serving: so does the listener.
                () = grpc.closed() => return,
            };
            let (stream, address) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors, mostly: wait rather than spin.
                    tracing::warn!(%error, "accepting on the TCP client listener failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            turns.taken().await;
            // Refused connections are counted and logged, and closed: a TCP
            // client would need TLS before it could be told why.
            let Ok((open, handshake)) = admission.admit(Key::Address(address.ip())) else { continue };
            let (grpc, deadline, tls) = (grpc.clone(), admission.handshake_timeout, tls.clone());
            tokio::spawn(async move {
                let start = async {
                    let mut stream = match tls {
                        None => ClientStream::Plain(stream),
                        Some(tls) => {
                            let stream = tls.api_acceptor().accept(stream).await?;
                            let certificate =
                                stream.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned().map(Arc::new);
                            ClientStream::Tls(Box::new(stream), TcpClient { certificate })
                        }
                    };
                    let mut first = [0u8];
                    stream.read_exact(&mut first).await?;
                    let start = read_http2_start(&mut stream, first[0]).await?;
                    Ok::<_, io::Error>((start, stream))
                };
                let start = tokio::time::timeout(deadline, start).await;
                drop(handshake);
                match start {
                    Ok(Ok((start, stream))) => {
                        let _ = grpc.send(Ok(Replayed::new(start, stream, open))).await;
                    }
                    Ok(Err(error)) => {
                        tracing::debug!(%address, %error, "TCP client closed: no TLS handshake or HTTP/2 start");
                    }
                    Err(_) => tracing::debug!(%address, "TCP client silent past the handshake timeout closed"),
                }
            });
        }
    });
    ReceiverStream::new(incoming)
}

impl Connected for ClientStream {
    type ConnectInfo = TcpClient;

    fn connect_info(&self) -> TcpClient {
        match self {
            ClientStream::Plain(_) => TcpClient { certificate: None },
            ClientStream::Tls(_, client) => client.clone(),
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s, _) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, data),
            ClientStream::Tls(s, _) => Pin::new(s).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, data),
            ClientStream::Tls(s, _) => Pin::new(s).poll_write_vectored(cx, data),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientStream::Plain(s) => s.is_write_vectored(),
            ClientStream::Tls(s, _) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s, _) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s, _) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
