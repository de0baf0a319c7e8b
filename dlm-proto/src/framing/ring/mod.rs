//! A framed session's bytes through shared memory instead of the socket,
//! for clients on the agent's node: only the wake-ups go through the kernel
//! (an eventfd write when the reader sleeps), which on one CPU halves a
//! round trip's system time (the peer benchmark's eventfd floor).
//!
//! The agent makes a sealed memfd holding two byte rings (client to agent,
//! agent to client) and two eventfds ("bells"), and passes them to the
//! client over the session's socket; the socket then carries nothing
//! but the end of the session (either side closing it). A writer copies
//! its bytes into the ring and rings the reader's bell only when the
//! reader said it was going to sleep; a reader that finds its ring empty
//! says so, looks once more, and waits on its bell.
//!
//! The agent trusts nothing in the shared memory: it keeps its own
//! indices, reads the client's only to bound what it copies, and copies
//! every byte out before decoding it. The memfd is sealed against
//! shrinking before the client sees it, so a client cannot make the
//! agent's mapping fault. A client that writes nonsense into its ring gets
//! what writing nonsense on its socket gets: a frame that does not decode
//! ends its session; one that claims more bytes than the ring holds too.
//!
//! A full ring is looked at again every millisecond
//! ([`super::FramedWrite::writable`]): it means a reader far behind, which
//! the frame sink's bounds deal with as they do a full socket.

#![allow(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering, fence};
use std::task::{Context, Poll, ready};

use atomic_waker::AtomicWaker;
use tokio::io::unix::AsyncFd;
use tokio::io::{Interest, ReadBuf};

mod handoff;
mod watch;
pub use handoff::{accept, offer};
pub use watch::{Hush, Registration, RingWatch, Watched};

/// Bytes of each ring's data (a power of two): room for many requests and
/// answers (tens of bytes each); a frame longer than the ring (an LVB-sized
/// one is not) goes through in pieces.
pub const RING_LEN: usize = 16 * 1024;

/// Bytes of shared memory one session's rings take.
pub const SESSION_SHARED_LEN: usize = MAP_LEN;
/// A ring's header: the producer's index, the consumer's index and the
/// consumer's "asleep" flag, each on its own cache line.
const HEADER_LEN: usize = 192;
const TAIL: usize = 0;
const HEAD: usize = 64;
const WAITING: usize = 128;
const _: () = assert!(RING_LEN.is_power_of_two() && RING_LEN <= u32::MAX as usize / 2, "indices wrap at u32");

/// The two rings: client to agent first, then agent to client.
const MAP_LEN: usize = 2 * (HEADER_LEN + RING_LEN);
const TO_AGENT: usize = 0;
const TO_CLIENT: usize = HEADER_LEN + RING_LEN;

/// The mapping of the memfd, shared by both halves.
struct Mapping {
    base: *mut u8,
}

// SAFETY: the mapping is plain shared memory; every access to it goes
// through atomics or byte copies of ranges this side owns at that moment.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn map(memfd: &OwnedFd) -> io::Result<Mapping> {
        // SAFETY: maps MAP_LEN bytes of an open memfd at least that long.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MAP_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memfd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { base: base.cast() })
    }

    fn atomic(&self, offset: usize) -> &AtomicU32 {
        debug_assert!(offset + 4 <= MAP_LEN && offset.is_multiple_of(4));
        // SAFETY: in bounds, aligned (page-aligned base), and only ever
        // accessed atomically by both processes.
        unsafe { &*self.base.add(offset).cast::<AtomicU32>() }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `map` mapped; no reference outlives
        // the halves holding this mapping.
        unsafe { libc::munmap(self.base.cast(), MAP_LEN) };
    }
}

/// One direction's ring as one side sees it.
#[derive(Clone)]
struct Ring {
    map: Arc<Mapping>,
    at: usize,
}

impl Ring {
    fn tail(&self) -> &AtomicU32 {
        self.map.atomic(self.at + TAIL)
    }
    fn head(&self) -> &AtomicU32 {
        self.map.atomic(self.at + HEAD)
    }
    fn waiting(&self) -> &AtomicU32 {
        self.map.atomic(self.at + WAITING)
    }
    fn data(&self) -> *mut u8 {
        // SAFETY: the data follows the header inside the mapping.
        unsafe { self.map.base.add(self.at + HEADER_LEN) }
    }
}

/// The consuming side of a ring.
pub struct RingRead {
    ring: Ring,
    /// Where this side has read to (its own copy: the shared one is only
    /// published). One reader at a time.
    head: AtomicU32,
    /// Rung by the writer when this side sleeps.
    bell: AsyncFd<OwnedFd>,
    /// This side's task while it sleeps, for a [`RingWatch`] that stands
    /// in for the bell (the agent's spinning worker, a client's reader
    /// woken on one CPU).
    waker: Arc<AtomicWaker>,
    /// The session's socket: readable only when the other side closed it.
    socket: Arc<AsyncFd<StdUnixStream>>,
}

/// The producing side of a ring.
pub struct RingWrite {
    ring: Ring,
    /// Where this side has written to (its own copy). Writes are serialized
    /// by the frame sink's lock.
    tail: AtomicU32,
    /// The reader's bell (shared with the bells owed in a [`bells_after`]).
    bell: Arc<OwnedFd>,
}

#[cfg(test)]
impl RingRead {
    /// How many times this side's bell was rung since this was last asked.
    fn rings_since_asked(&self) -> u64 {
        let mut count = 0u64;
        // SAFETY: the bell is an open non-blocking eventfd; 8 bytes into a u64.
        let n = unsafe { libc::read(self.bell.get_ref().as_raw_fd(), (&raw mut count).cast(), 8) };
        if n == 8 { count } else { 0 }
    }
}

fn corrupt() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "the shared ring's indices are out of bounds")
}

impl RingRead {
    /// A look at this ring for other threads of this process (see
    /// [`RingWatch`]).
    #[must_use]
    pub fn watch(&self) -> RingWatch {
        RingWatch { ring: self.ring.clone(), waker: self.waker.clone() }
    }

    /// Takes what the ring holds without waiting (`WouldBlock` when empty).
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // A reader that reads is awake: the writer need not ring its bell
        // (a spinning client's reader would otherwise be rung for every
        // answer, each ring an event that wakes a thread of its runtime).
        // It says it sleeps again, and looks once more, before it does.
        if self.ring.waiting().load(Ordering::Relaxed) != 0 {
            self.ring.waiting().store(0, Ordering::Relaxed);
        }
        let head = self.head.load(Ordering::Relaxed);
        let tail = self.ring.tail().load(Ordering::Acquire);
        let available = tail.wrapping_sub(head) as usize;
        if available > RING_LEN {
            return Err(corrupt());
        }
        if available == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = available.min(buf.len());
        let start = head as usize % RING_LEN;
        let first = n.min(RING_LEN - start);
        // SAFETY: both ranges lie inside the ring's data (checked above:
        // `first` fits before its end, `n - first` after its start), and in
        // `buf`. An honest producer does not write them until `head` moves
        // past them; a dishonest one writing meanwhile changes only which
        // bytes are copied, plain bytes the decoder checks like any others.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ring.data().add(start), buf.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(self.ring.data(), buf.as_mut_ptr().add(first), n - first);
        }
        let head = head.wrapping_add(n as u32);
        self.head.store(head, Ordering::Relaxed);
        self.ring.head().store(head, Ordering::Release);
        Ok(n)
    }

    /// Reads what the ring holds, or waits for its bell; the end of the
    /// stream (nothing read) once the ring is empty and the other side
    /// closed its socket.
    pub fn poll_read(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Poll::Ready(Err(error)),
            }
            // Empty: the other side may have gone. Polled until pending, so
            // that the socket's end wakes this task (a readiness found and
            // cleared registers nothing).
            while let Poll::Ready(ready) = self.socket.poll_read_ready(cx) {
                let mut ready = ready?;
                let mut byte = [0u8; 1];
                let mut socket = self.socket.get_ref();
                match io::Read::read(&mut socket, &mut byte) {
                    Ok(0) => return Poll::Ready(Ok(())),
                    Ok(_) => {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "bytes on a ring session's socket",
                        )));
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => ready.clear_ready(),
                    Err(error) => return Poll::Ready(Err(error)),
                }
            }
            // Going to sleep: say so, then look once more (the writer
            // publishes before it reads the flag). The task first, for a
            // watcher that takes the flag down and looks in the writer's
            // place.
            self.waker.register(cx.waker());
            self.ring.waiting().store(1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if self.ring.tail().load(Ordering::SeqCst) != self.head.load(Ordering::Relaxed) {
                self.ring.waiting().store(0, Ordering::Relaxed);
                continue;
            }
            // The bell is never read: every ring of an eventfd wakes its
            // watchers, whatever its count, and the runtime's epoll is
            // edge-triggered, so each ring is an event of its own, and
            // clearing the readiness (kept if an event came since it was
            // seen) is all a wake-up needs: a system call a request fewer.
            // The count grows by one a ring; it would take 2^64 of them to
            // fill.
            ready!(self.bell.poll_read_ready(cx))?.clear_ready();
            self.ring.waiting().store(0, Ordering::Relaxed);
        }
    }
}

impl RingWrite {
    /// Copies what the ring has room for (`WouldBlock` when it is full),
    /// ringing the reader's bell if it sleeps.
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        let tail = self.tail.load(Ordering::Relaxed);
        let head = self.ring.head().load(Ordering::Acquire);
        let used = tail.wrapping_sub(head) as usize;
        if used > RING_LEN {
            return Err(corrupt());
        }
        let n = (RING_LEN - used).min(buf.len());
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let start = tail as usize % RING_LEN;
        let first = n.min(RING_LEN - start);
        // SAFETY: both ranges lie inside the ring's data, past the
        // consumer's head: the consumer does not read them until `tail`
        // moves past them.
        unsafe {
            std::ptr::copy_nonoverlapping(buf.as_ptr(), self.ring.data().add(start), first);
            std::ptr::copy_nonoverlapping(buf.as_ptr().add(first), self.ring.data(), n - first);
        }
        let tail = tail.wrapping_add(n as u32);
        self.tail.store(tail, Ordering::Relaxed);
        self.ring.tail().store(tail, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.ring.waiting().load(Ordering::SeqCst) != 0 && !owe_bell(&self.ring, &self.bell) {
            ring_bell(self.bell.as_raw_fd());
        }
        Ok(n)
    }
}

thread_local! {
    /// Whether this thread is inside a [`bells_after`].
    static DEFERRING: Cell<bool> = const { Cell::new(false) };
    /// The bells its writes owe, each with the ring whose flag says
    /// whether its reader still sleeps.
    static OWED: RefCell<Vec<(Ring, Arc<OwnedFd>)>> = const { RefCell::new(Vec::new()) };
}

/// Runs `write`, ringing the bells its ring writes owe only once it is
/// done, so that every reader's bytes are in their rings before the first
/// bell: a pass that answers several sessions of one client process wakes
/// it once with all of them there, rather than waking it (on one CPU: being
/// preempted by it) once for each. A reader that woke meanwhile, or was
/// woken by another of its process's readers (see
/// [`Watched::wake_sleepers`]), is not rung. Inside another, the outer one
/// rings.
pub fn bells_after<R>(write: impl FnOnce() -> R) -> R {
    if DEFERRING.replace(true) {
        return write();
    }
    let _ring = RingOwed;
    write()
}

/// Rings the bells owed when a [`bells_after`] ends, however it ends.
struct RingOwed;

impl Drop for RingOwed {
    fn drop(&mut self) {
        DEFERRING.set(false);
        OWED.with_borrow_mut(|owed| {
            // The rings' tails were published before their flags were read
            // (in `try_write`); the flags are read again now.
            fence(Ordering::SeqCst);
            for (ring, bell) in owed.drain(..) {
                if ring.waiting().load(Ordering::SeqCst) != 0 {
                    ring_bell(bell.as_raw_fd());
                }
            }
        });
    }
}

/// Inside a [`bells_after`], notes that `bell` is owed: whether it did.
fn owe_bell(ring: &Ring, bell: &Arc<OwnedFd>) -> bool {
    if !DEFERRING.get() {
        return false;
    }
    OWED.with_borrow_mut(|owed| {
        // A frame written in pieces owes the same bell again, at once.
        if !owed.last().is_some_and(|(_, last)| Arc::ptr_eq(last, bell)) {
            owed.push((ring.clone(), bell.clone()));
        }
    });
    true
}

fn ring_bell(fd: RawFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer to an eventfd.
    unsafe { libc::write(fd, one.as_ptr().cast(), 8) };
}

fn registered<T: AsRawFd>(fd: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: the value owns its descriptor, open and the same for as long
    // as it lives, and the `AsyncFd` owns the value.
    Ok(unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?)
}

/// The halves of a session that asked for rings: through rings, or, when
/// the agent served it on its socket, `read` and `write` are `None`.
pub struct RingHalves {
    /// The ring this side reads.
    pub read: Option<RingRead>,
    /// The ring this side writes.
    pub write: Option<RingWrite>,
    /// The socket: the session's end either way, and its bytes without rings.
    pub socket: Arc<AsyncFd<StdUnixStream>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The agent's and the client's halves of one session, over a socket pair.
    async fn session(rings: bool) -> (RingHalves, RingHalves) {
        let (agent, client) = StdUnixStream::pair().expect("pair");
        let agent = offer(agent, rings).expect("offered");
        let client = accept(client).await.expect("accepted");
        (agent, client)
    }

    async fn read_exactly(read: &RingRead, n: usize) -> io::Result<Vec<u8>> {
        let mut got = Vec::new();
        while got.len() < n {
            let mut buffer = vec![0u8; n - got.len()];
            let mut buf = ReadBuf::new(&mut buffer);
            std::future::poll_fn(|cx| read.poll_read(cx, &mut buf)).await?;
            if buf.filled().is_empty() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            got.extend_from_slice(buf.filled());
        }
        Ok(got)
    }

    #[tokio::test]
    async fn bytes_go_both_ways_and_wrap_around_the_ring() {
        let (agent, client) = session(true).await;
        let (agent_read, agent_write) = (agent.read.expect("ring"), agent.write.expect("ring"));
        let (client_read, client_write) = (client.read.expect("ring"), client.write.expect("ring"));
        // Three times round each ring, in odd-sized pieces.
        let mut sent = 0usize;
        while sent < 3 * RING_LEN {
            let piece: Vec<u8> = (0..1000).map(|i| ((sent + i) % 251) as u8).collect();
            assert_eq!(client_write.try_write(&piece).expect("room"), piece.len());
            assert_eq!(read_exactly(&agent_read, piece.len()).await.expect("read"), piece);
            assert_eq!(agent_write.try_write(&piece).expect("room"), piece.len());
            assert_eq!(read_exactly(&client_read, piece.len()).await.expect("read"), piece);
            sent += piece.len();
        }
    }

    #[tokio::test]
    async fn a_full_ring_takes_nothing_until_its_reader_reads() {
        let (agent, client) = session(true).await;
        let (agent_read, client_write) = (agent.read.expect("ring"), client.write.expect("ring"));
        let big = vec![7u8; RING_LEN + 100];
        assert_eq!(client_write.try_write(&big).expect("room"), RING_LEN, "takes what fits");
        let full = client_write.try_write(&big).expect_err("full");
        assert_eq!(full.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(read_exactly(&agent_read, 100).await.expect("read").len(), 100);
        assert_eq!(client_write.try_write(&big).expect("room"), 100);
    }

    #[tokio::test]
    async fn a_sleeping_reader_is_woken_by_its_bell() {
        let (agent, client) = session(true).await;
        let agent_read = agent.read.expect("ring");
        let client_write = client.write.expect("ring");
        let reading = tokio::spawn(async move { read_exactly(&agent_read, 5).await });
        // Let the reader find the ring empty and sleep.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!reading.is_finished());
        client_write.try_write(b"hello").expect("room");
        let got = tokio::time::timeout(Duration::from_secs(5), reading).await.expect("woken").expect("task");
        assert_eq!(got.expect("read"), b"hello");
    }

    #[tokio::test]
    async fn a_reader_is_rung_only_while_it_sleeps() {
        let (agent, client) = session(true).await;
        let (agent_read, client_write) = (agent.read.expect("ring"), client.write.expect("ring"));
        let mut buffer = [0u8; 8];
        let sleep = |read: &RingRead, buffer: &mut [u8]| {
            let mut buf = ReadBuf::new(buffer);
            let polled = read.poll_read(&mut Context::from_waker(std::task::Waker::noop()), &mut buf);
            assert!(polled.is_pending(), "nothing to read yet");
        };
        // Asleep: a write rings it.
        sleep(&agent_read, &mut buffer);
        client_write.try_write(b"one").expect("room");
        assert_eq!(agent_read.rings_since_asked(), 1);
        assert_eq!(agent_read.try_read(&mut buffer).expect("read"), 3);
        // Asleep again, then awake (reading, as a spinning reader does): a
        // write finds it awake and does not ring.
        sleep(&agent_read, &mut buffer);
        assert_eq!(agent_read.try_read(&mut buffer).expect_err("empty").kind(), io::ErrorKind::WouldBlock);
        client_write.try_write(b"two").expect("room");
        assert_eq!(agent_read.rings_since_asked(), 0, "rung while it was reading");
        assert_eq!(agent_read.try_read(&mut buffer).expect("read"), 3);
        assert_eq!(&buffer[..3], b"two");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_ping_pong_wakes_each_side_every_time() {
        let (agent, client) = session(true).await;
        let (agent_read, agent_write) = (agent.read.expect("ring"), agent.write.expect("ring"));
        let (client_read, client_write) = (client.read.expect("ring"), client.write.expect("ring"));
        let echo = tokio::spawn(async move {
            for _ in 0..2000 {
                let got = read_exactly(&agent_read, 8).await.expect("read");
                agent_write.try_write(&got).expect("room");
            }
        });
        for round in 0u64..2000 {
            client_write.try_write(&round.to_le_bytes()).expect("room");
            let answer = tokio::time::timeout(Duration::from_secs(5), read_exactly(&client_read, 8)).await;
            assert_eq!(answer.expect("woken in time").expect("read"), round.to_le_bytes());
        }
        echo.await.expect("echo");
    }

    #[tokio::test]
    async fn indices_out_of_bounds_are_refused_not_followed() {
        let (agent, client) = session(true).await;
        let (agent_read, agent_write) = (agent.read.expect("ring"), agent.write.expect("ring"));
        let client_write = client.write.expect("ring");
        let client_read = client.read.expect("ring");
        // A client that claims to have written more than the ring holds.
        client_write.ring.tail().store(u32::try_from(RING_LEN).expect("fits") + 1, Ordering::SeqCst);
        let mut buffer = [0u8; 16];
        assert_eq!(agent_read.try_read(&mut buffer).expect_err("refused").kind(), io::ErrorKind::InvalidData);
        // Or to have read what the agent never wrote.
        client_read.ring.head().store(12345, Ordering::SeqCst);
        assert_eq!(agent_write.try_write(b"x").expect_err("refused").kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn the_other_side_closing_its_socket_ends_the_stream_after_what_it_wrote() {
        let (agent, client) = session(true).await;
        let agent_read = agent.read.expect("ring");
        let client_write = client.write.expect("ring");
        client_write.try_write(b"last words").expect("room");
        drop(client_write);
        drop(client.read);
        drop(client.socket);
        assert_eq!(read_exactly(&agent_read, 10).await.expect("read"), b"last words");
        let ended = tokio::time::timeout(Duration::from_secs(5), read_exactly(&agent_read, 1)).await.expect("ended");
        assert_eq!(ended.expect_err("end of stream").kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn a_sleeping_reader_is_woken_by_the_other_side_closing() {
        // The client's socket was readable once (the agent's mark): its
        // reader must still be woken by the agent's end, and not only by a bell.
        let (agent, client) = session(true).await;
        let client_read = client.read.expect("ring");
        let reading = tokio::spawn(async move { read_exactly(&client_read, 1).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!reading.is_finished());
        drop(agent);
        let ended = tokio::time::timeout(Duration::from_secs(5), reading).await.expect("woken").expect("task");
        assert_eq!(ended.expect_err("end of stream").kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn without_a_ring_to_spare_the_session_stays_on_its_socket() {
        let (agent, client) = session(false).await;
        assert!(agent.read.is_none() && agent.write.is_none() && client.read.is_none() && client.write.is_none());
        io::Write::write_all(&mut client.socket.get_ref(), b"plain").expect("written");
        let mut got = [0u8; 5];
        let mut ready = agent.socket.readable().await.expect("readable");
        ready.clear_ready();
        io::Read::read_exact(&mut agent.socket.get_ref(), &mut got).expect("read");
        assert_eq!(&got, b"plain");
    }
}
