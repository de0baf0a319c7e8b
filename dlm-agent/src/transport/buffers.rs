//! Every TCP socket of the agent gets fixed kernel buffers
//! ([`TCP_BUFFER_BYTES`] each way), so that no link's buffers grow while
//! the node is short of memory. Set on the listeners (accepted sockets
//! inherit them, and the window a peer is offered is sized from them) and
//! on each dialed socket before it connects.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::bounds::TCP_BUFFER_BYTES;

/// Fixes the buffers of a listener's future connections.
///
/// # Errors
/// The kernel refused the option.
pub fn bound_listener(listener: &TcpListener) -> io::Result<()> {
    let socket = socket2::SockRef::from(listener);
    socket.set_send_buffer_size(TCP_BUFFER_BYTES)?;
    socket.set_recv_buffer_size(TCP_BUFFER_BYTES)
}

/// Connects to `address` from a socket whose buffers are fixed first.
///
/// # Errors
/// Making the socket, setting its buffers, or connecting failed.
pub async fn connect(address: SocketAddr) -> io::Result<TcpStream> {
    let socket = if address.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    let size = u32::try_from(TCP_BUFFER_BYTES).unwrap_or(u32::MAX);
    socket.set_send_buffer_size(size)?;
    socket.set_recv_buffer_size(size)?;
    socket.connect(address).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the kernel reports for a buffer asked as `TCP_BUFFER_BYTES`
    /// (it doubles the request).
    fn reported(stream: &TcpStream) -> (usize, usize) {
        let socket = socket2::SockRef::from(stream);
        (socket.send_buffer_size().expect("SO_SNDBUF"), socket.recv_buffer_size().expect("SO_RCVBUF"))
    }

    /// Sends 64 MiB from `dialed` to `accepted` (enough for autotuning to
    /// grow buffers that were not fixed) and gives both back.
    async fn pump(mut dialed: TcpStream, mut accepted: TcpStream) -> (TcpStream, TcpStream) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 1 << 20];
            for _ in 0..64 {
                dialed.write_all(&chunk).await.expect("write");
            }
            dialed
        });
        let mut buffer = vec![0u8; 1 << 16];
        let mut read = 0;
        while read < 64 << 20 {
            read += accepted.read(&mut buffer).await.expect("read");
        }
        (writer.await.expect("writer"), accepted)
    }

    #[tokio::test]
    async fn dialed_and_accepted_sockets_keep_the_bounded_buffers_after_traffic() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        bound_listener(&listener).expect("bound listener");
        let address = listener.local_addr().expect("address");
        let (dialed, accepted) = tokio::join!(connect(address), listener.accept());
        let (dialed, accepted) = pump(dialed.expect("connect"), accepted.expect("accept").0).await;
        for stream in [&dialed, &accepted] {
            assert_eq!(reported(stream), (2 * TCP_BUFFER_BYTES, 2 * TCP_BUFFER_BYTES));
        }
    }

    #[tokio::test]
    async fn unbounded_sockets_do_grow_so_the_bound_is_what_holds_them() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (dialed, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        let (dialed, accepted) = (dialed.expect("connect"), accepted.expect("accept").0);
        let before = reported(&accepted).1;
        let (_dialed, accepted) = pump(dialed, accepted).await;
        let after = reported(&accepted).1;
        println!("receive buffer {before} -> {after} bytes");
        assert!(
            after > before,
            "the receive buffer did not grow ({before} -> {after}): the check above proves nothing"
        );
    }
}
