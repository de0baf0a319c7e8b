//! A framed connection's socket, registered with the runtime for reading
//! only.
//!
//! Why not tokio's `UnixStream`: it registers every socket for readability
//! *and* writability, edge-triggered. A Unix socket signals "writable" each
//! time the other end reads (the reader frees the bytes, and the kernel
//! wakes whoever waits on the writer's socket), so every request a client
//! sends wakes the *client* when the agent reads it, and every answer wakes
//! the agent when the client reads it: a thread woken for nothing, twice a
//! request, parked again at once (on one CPU, a preemption; on two, a
//! cross-CPU wake-up). Measured on one CPU, one client: 3.2 context
//! switches per request where a ping-pong needs 2; 2.1 with this.
//!
//! Framed connections write without waiting (the sink writes from the
//! sender's task and only waits when the socket is full), so they need
//! writability only then: [`FramedWrite::writable`] registers a duplicate of
//! the socket for it for the duration of that wait.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, Interest, ReadBuf};
use tokio::net::UnixStream;

/// Splits `stream` into its read and write halves, the socket registered
/// for reading only. The write side shuts down when the write half drops.
///
/// # Errors
/// The socket cannot be taken from the runtime or registered again.
pub fn split(stream: UnixStream) -> io::Result<(FramedRead, FramedWrite)> {
    let socket = Arc::new(register(stream.into_std()?, Interest::READABLE)?);
    Ok((FramedRead { socket: socket.clone(), ring: None }, FramedWrite { socket, ring: None }))
}

/// The agent's halves of a session that asked for rings (see
/// [`super::ring`]): when `rings`, they are made and passed to the client
/// over `stream`; else the client is told to stay on the socket.
///
/// # Errors
/// The rings cannot be made or passed.
pub fn split_offering_ring(stream: UnixStream, rings: bool) -> io::Result<(FramedRead, FramedWrite)> {
    halves(super::ring::offer(stream.into_std()?, rings)?)
}

/// The client's halves of a session that asked for rings: through the
/// rings the agent passed, or on the socket when it passed none.
///
/// # Errors
/// The agent passed none, or they cannot be mapped.
pub async fn split_accepting_ring(stream: UnixStream) -> io::Result<(FramedRead, FramedWrite)> {
    halves(super::ring::accept(stream.into_std()?).await?)
}

fn halves(ring: super::ring::RingHalves) -> io::Result<(FramedRead, FramedWrite)> {
    let super::ring::RingHalves { read, write, socket } = ring;
    Ok((FramedRead { socket: socket.clone(), ring: read }, FramedWrite { socket, ring: write }))
}

/// Registers `socket` with the runtime for `interest`, non-blocking (a
/// tokio stream's already is; a duplicate shares its flag, set here so that
/// no caller depends on that).
#[allow(unsafe_code)]
fn register(socket: StdUnixStream, interest: Interest) -> io::Result<AsyncFd<StdUnixStream>> {
    socket.set_nonblocking(true)?;
    // SAFETY: the stream owns its descriptor, which stays open and the same
    // for as long as the stream lives, and the `AsyncFd` owns the stream.
    Ok(unsafe { AsyncFd::register_with_interest(socket, interest) }?)
}

/// The read half: an [`AsyncRead`], and non-blocking reads for a reader
/// that polls.
pub struct FramedRead {
    socket: Arc<AsyncFd<StdUnixStream>>,
    ring: Option<super::ring::RingRead>,
}

impl FramedRead {
    /// Whether the session's bytes come through a shared-memory ring (not
    /// the socket).
    #[must_use]
    pub fn through_ring(&self) -> bool {
        self.ring.is_some()
    }

    /// A look at the session's ring, for other threads of this process
    /// (`None` on the socket).
    #[must_use]
    pub fn ring_watch(&self) -> Option<super::ring::RingWatch> {
        self.ring.as_ref().map(super::ring::RingRead::watch)
    }

    /// Reads what is there without waiting (`WouldBlock` when nothing is).
    ///
    /// # Errors
    /// As `read(2)`, `WouldBlock` included.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(ring) = &self.ring {
            return ring.try_read(buf);
        }
        self.socket.get_ref().read(buf)
    }
}

impl AsyncRead for FramedRead {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Some(ring) = &self.ring {
            return ring.poll_read(cx, buf);
        }
        loop {
            let mut ready = ready!(self.socket.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let room = unfilled.len();
            match self.socket.get_ref().read(unfilled) {
                Ok(read) => {
                    // Less than there was room for: the socket is empty (a
                    // stream socket's read takes all it has), so the next
                    // read waits for the next event instead of making a
                    // system call only to hear `WouldBlock` (as tokio's
                    // own streams do; an event since this readiness was
                    // seen keeps it set).
                    if read > 0 && read < room {
                        ready.clear_ready();
                    }
                    buf.advance(read);
                    return Poll::Ready(Ok(()));
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => ready.clear_ready(),
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
    }
}

/// The write half: non-blocking writes, and a wait for room.
pub struct FramedWrite {
    socket: Arc<AsyncFd<StdUnixStream>>,
    ring: Option<super::ring::RingWrite>,
}

impl FramedWrite {
    /// Writes what the socket takes without waiting (`WouldBlock` when full).
    ///
    /// # Errors
    /// As `write(2)`, `WouldBlock` included.
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        if let Some(ring) = &self.ring {
            return ring.try_write(buf);
        }
        self.socket.get_ref().write(buf)
    }

    /// Waits until the socket has room to write, through a duplicate of it
    /// registered for writability while this waits.
    ///
    /// # Errors
    /// The duplicate cannot be made or registered, or the socket failed.
    pub async fn writable(&self) -> io::Result<()> {
        if self.ring.is_some() {
            // A full ring is looked at again shortly (see `super::ring`).
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            return Ok(());
        }
        let duplicate = StdUnixStream::from(self.socket.get_ref().as_fd().try_clone_to_owned()?);
        let waiting = register(duplicate, Interest::WRITABLE)?;
        let _ready = waiting.writable().await?;
        Ok(())
    }
}

impl Drop for FramedWrite {
    fn drop(&mut self) {
        // As tokio's write half does: the other end reads the end of the
        // stream, while this end may still read.
        let _ = self.socket.get_ref().shutdown(Shutdown::Write);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn reads_writes_waits_for_room_and_shuts_down_when_the_write_half_drops() {
        let (ours, theirs) = UnixStream::pair().expect("pair");
        let (mut read, write) = split(ours).expect("split");
        let (mut their_read, their_write) = split(theirs).expect("split");
        assert_eq!(write.try_write(b"ping").expect("written"), 4);
        let mut got = [0; 4];
        their_read.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"ping");
        // Nothing there: a non-blocking read says so.
        assert_eq!(read.try_read(&mut got).map_err(|e| e.kind()), Err(io::ErrorKind::WouldBlock));

        // Fill the socket, then wait for room while the other end reads.
        let block = vec![7u8; 64 << 10];
        let mut sent = 0;
        while let Ok(n) = write.try_write(&block) {
            sent += n;
        }
        assert!(sent > 0);
        let drain = tokio::spawn(async move {
            let mut sink = vec![0; sent + 4];
            their_read.read_exact(&mut sink).await.expect("drained");
            their_read
        });
        tokio::time::timeout(std::time::Duration::from_secs(5), write.writable())
            .await
            .expect("room in time")
            .expect("writable");
        let mut written = 0;
        while written < 4 {
            match write.try_write(&b"more"[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => write.writable().await.expect("writable"),
                Err(e) => panic!("{e}"),
            }
        }
        let mut their_read = drain.await.expect("drain");
        drop(write);
        let mut rest = Vec::new();
        their_read.read_to_end(&mut rest).await.expect("to the end");
        assert!(rest.is_empty(), "nothing after the shutdown");
        // Their side can still write to ours after ours shut its write side.
        assert_eq!(their_write.try_write(b"late").expect("written"), 4);
        read.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"late");
    }
}
