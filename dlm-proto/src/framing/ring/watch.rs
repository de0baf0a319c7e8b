//! Other threads' look at a process's ring sessions: whether bytes wait in
//! a ring, and, while a thread of the reading process spins anyway,
//! standing in for the writers' bells.
//!
//! A writer rings a reader's bell (an eventfd write: a system call on the
//! writer's side, and an event the reader's runtime must take) only when
//! the reader said it sleeps. A thread that spins anyway (the agent's
//! worker before it parks) can take those "asleep" flags down while it
//! spins ([`Watched::hush`]), look at the rings itself, and wake a reader
//! whose ring got bytes with a plain task wake-up: no system call on either
//! side. A client's spin only looks ([`Watched::any_unread`]): hushing its
//! other sessions made a contended lock's hand-offs slower (the session it
//! woke ran after it on its thread, where the agent's ring had woken the
//! runtime's other thread to run it at once). Before it stops it puts
//! the flags back and looks once more, so a write it did not see rings as
//! usual: no wake-up is lost. The order is the bell's own: a writer
//! publishes its bytes before it reads the flag, the watcher puts the flag
//! back before it looks at the bytes.
//!
//! On one CPU a client's reader that got bytes wakes the process's other
//! readers that sleep with bytes waiting ([`Watched::wake_sleepers`]),
//! taking their flags down for good (a woken reader raises its own again
//! before it sleeps). The agent rings a pass's bells only after all its
//! writes ([`super::bells_after`]), so the answers a pass has for several
//! sessions of one process wake it once: the others' bells, each a switch
//! to the client and back, are not rung.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};

use atomic_waker::AtomicWaker;

use super::Ring;

/// A look at one ring from any thread of its reading process. A writer that
/// lies about its tail only makes it say "bytes wait".
pub struct RingWatch {
    pub(super) ring: Ring,
    /// The reader's task while it sleeps (registered before it says so).
    pub(super) waker: Arc<AtomicWaker>,
}

impl RingWatch {
    /// Whether bytes wait in the ring that its reader has not taken.
    #[must_use]
    pub fn unread(&self) -> bool {
        self.ring.tail().load(Ordering::Acquire) != self.ring.head().load(Ordering::Relaxed)
    }

    /// If the reader sleeps, tells the writer not to ring it: whether it
    /// did (then [`RingWatch::unhush`] must follow).
    fn hush(&self) -> bool {
        // A load first: an awake reader's flag is not written (its cache
        // line is the writer's to read).
        self.ring.waiting().load(Ordering::Relaxed) != 0 && self.ring.waiting().swap(0, Ordering::SeqCst) != 0
    }

    /// Tells the writer to ring again, then looks once more: bytes that
    /// came meanwhile wake the reader. A reader that woke in between only
    /// gets a ring it does not need.
    fn unhush(&self) {
        self.ring.waiting().store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.wake_if_unread();
    }

    /// Wakes the reader if bytes wait: whether they did.
    fn wake_if_unread(&self) -> bool {
        let unread = self.ring.tail().load(Ordering::SeqCst) != self.ring.head().load(Ordering::Relaxed);
        if unread {
            self.waker.wake();
        }
        unread
    }

    /// If the reader sleeps with bytes waiting, takes its flag down (its
    /// writer need not ring) and wakes it: whether it did. The reader,
    /// woken, reads, and says it sleeps again when its ring is empty; woken
    /// needlessly (it read the bytes first), it only looks once more.
    fn wake_sleeper(&self) -> bool {
        let woken = self.unread()
            && self.ring.waiting().load(Ordering::Relaxed) != 0
            && self.ring.waiting().swap(0, Ordering::SeqCst) != 0;
        if woken {
            self.waker.wake();
        }
        woken
    }
}

/// A process's ring sessions that its spinning threads look at, each under
/// a number. Changed only when sessions start and end; looked at with
/// `try_read`, so a spin never waits for it.
pub struct Watched {
    rings: RwLock<Vec<Entry>>,
    next: AtomicU64,
    /// A thread hushes the bells now: one at a time.
    hushing: AtomicBool,
}

struct Entry {
    number: u64,
    watch: RingWatch,
    /// Hushed by the thread hushing now.
    hushed: AtomicBool,
}

impl Watched {
    /// An empty list (for a `static`).
    #[must_use]
    pub const fn new() -> Watched {
        Watched { rings: RwLock::new(Vec::new()), next: AtomicU64::new(0), hushing: AtomicBool::new(false) }
    }

    /// Adds `watch` for as long as the registration lives.
    pub fn add(&'static self, watch: RingWatch) -> Registration {
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = Entry { number, watch, hushed: AtomicBool::new(false) };
        self.rings.write().unwrap_or_else(PoisonError::into_inner).push(entry);
        Registration { watched: self, number }
    }

    /// Whether a ring other than number `except` has bytes its reader has
    /// not taken (or the list is being changed: then it may).
    pub fn any_unread(&self, except: u64) -> bool {
        let Ok(rings) = self.rings.try_read() else { return true };
        rings.iter().any(|entry| entry.number != except && entry.watch.unread())
    }

    /// Wakes the readers, but ring number `except`'s, that sleep with bytes
    /// waiting, their writers told not to ring (their flags taken down;
    /// each raises its own again before it sleeps): for a reader that woke
    /// and may take its process's other answers on its thread (one CPU:
    /// each bell would be a wake-up, and a switch, of its own). How many it
    /// woke.
    pub fn wake_sleepers(&self, except: u64) -> usize {
        let Ok(rings) = self.rings.try_read() else { return 0 };
        rings.iter().filter(|entry| entry.number != except && entry.watch.wake_sleeper()).count()
    }

    /// Takes down the flags of the readers that sleep, but ring number
    /// `except`'s (the hushing thread's own session, if it has one), until
    /// the [`Hush`] is dropped; `None` when another thread hushes them now
    /// or the list is being changed.
    pub fn hush(&self, except: Option<u64>) -> Option<Hush<'_>> {
        if self.hushing.swap(true, Ordering::Acquire) {
            return None;
        }
        let Ok(rings) = self.rings.try_read() else {
            self.hushing.store(false, Ordering::Release);
            return None;
        };
        for entry in rings.iter() {
            let hushed = Some(entry.number) != except && entry.watch.hush();
            entry.hushed.store(hushed, Ordering::Relaxed);
        }
        Some(Hush { rings, hushing: &self.hushing, except })
    }
}

impl Default for Watched {
    fn default() -> Watched {
        Watched::new()
    }
}

/// A ring's place in [`Watched`], removed when this is dropped.
pub struct Registration {
    watched: &'static Watched,
    number: u64,
}

impl Registration {
    /// The ring's number in the list.
    #[must_use]
    pub fn number(&self) -> u64 {
        self.number
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut rings = self.watched.rings.write().unwrap_or_else(PoisonError::into_inner);
        // Never hushed now: a `Hush` holds the list for reading.
        if let Some(at) = rings.iter().position(|entry| entry.number == self.number) {
            rings.swap_remove(at);
        }
    }
}

/// The readers' flags taken down: their writers do not ring while this
/// lives. Dropping it puts them back, and wakes the readers whose rings got
/// bytes meanwhile.
pub struct Hush<'a> {
    rings: RwLockReadGuard<'a, Vec<Entry>>,
    hushing: &'a AtomicBool,
    /// The ring left alone.
    except: Option<u64>,
}

impl Hush<'_> {
    /// Wakes the hushed readers whose rings got bytes: whether any ring but
    /// the one left alone has bytes (an awake reader's too: its task has
    /// them to take).
    pub fn wake_unread(&self) -> bool {
        let mut any = false;
        for entry in self.rings.iter().filter(|entry| Some(entry.number) != self.except) {
            any |=
                if entry.hushed.load(Ordering::Relaxed) { entry.watch.wake_if_unread() } else { entry.watch.unread() };
        }
        any
    }
}

impl Drop for Hush<'_> {
    fn drop(&mut self) {
        for entry in self.rings.iter() {
            if entry.hushed.swap(false, Ordering::Relaxed) {
                entry.watch.unhush();
            }
        }
        self.hushing.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream as StdUnixStream;
    use std::sync::atomic::AtomicUsize;
    use std::task::{Context, Wake, Waker};
    use std::time::Duration;

    use tokio::io::ReadBuf;
    use tokio::io::unix::AsyncFd;

    use super::super::{RingRead, RingWrite, accept, bells_after, offer};
    use super::*;

    /// One session's rings, the reader's watched, and its wake-ups counted.
    struct Watching {
        read: RingRead,
        write: RingWrite,
        watched: &'static Watched,
        registered: Registration,
        wakes: Arc<Wakes>,
        /// Both ends' sockets, open for the test's length (either closing
        /// ends the session).
        _sockets: [Arc<AsyncFd<StdUnixStream>>; 2],
    }

    /// The agent's reader (a client's with `client_reads`) and the other
    /// side's writer; the reader on a list of its own (lists are `'static`).
    async fn watching(client_reads: bool) -> Watching {
        let (agent, client) = StdUnixStream::pair().expect("pair");
        let agent = offer(agent, true).expect("offered");
        let client = accept(client).await.expect("accepted");
        let _sockets = [agent.socket.clone(), client.socket.clone()];
        let (read, write) = if client_reads { (client.read, agent.write) } else { (agent.read, client.write) };
        let (read, write) = (read.expect("ring"), write.expect("ring"));
        let watched: &'static Watched = Box::leak(Box::new(Watched::new()));
        let registered = watched.add(read.watch());
        Watching { read, write, watched, registered, wakes: Arc::default(), _sockets }
    }

    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Watching {
        fn wakes(&self) -> usize {
            self.wakes.0.load(Ordering::SeqCst)
        }

        /// Polls the reader once with a waker that counts: it must find
        /// nothing and sleep.
        fn sleep(&self) {
            let waker = Waker::from(self.wakes.clone());
            let mut buffer = [0u8; 16];
            let mut buf = ReadBuf::new(&mut buffer);
            let polled = self.read.poll_read(&mut Context::from_waker(&waker), &mut buf);
            assert!(polled.is_pending(), "nothing to read yet");
        }
    }

    #[tokio::test]
    async fn a_hushed_sleeper_is_not_rung_but_woken_by_its_watcher() {
        let w = watching(false).await;
        w.sleep();
        let hush = w.watched.hush(None).expect("nobody else hushes");
        assert!(w.watched.hush(None).is_none(), "one thread hushes at a time");
        assert!(!hush.wake_unread(), "nothing written yet");
        w.write.try_write(b"one").expect("room");
        assert_eq!(w.read.rings_since_asked(), 0, "rung while hushed");
        assert!(hush.wake_unread(), "the watcher saw the bytes");
        assert_eq!(w.wakes(), 1, "the reader was woken");
        drop(hush);
        let mut buffer = [0u8; 8];
        assert_eq!(w.read.try_read(&mut buffer).expect("read"), 3);
        // Asleep again, no hush: writers ring as before.
        w.sleep();
        w.write.try_write(b"two").expect("room");
        assert_eq!(w.read.rings_since_asked(), 1, "not rung after the hush ended");
    }

    #[tokio::test]
    async fn bytes_written_while_hushed_wake_the_reader_when_the_hush_ends() {
        let w = watching(false).await;
        w.sleep();
        let hush = w.watched.hush(None).expect("nobody else hushes");
        w.write.try_write(b"one").expect("room");
        assert_eq!(w.wakes(), 0);
        drop(hush);
        assert_eq!(w.wakes(), 1, "the hush ended without waking the reader of bytes it let in unrung");
        assert_eq!(w.read.rings_since_asked(), 0);
        assert!(w.watched.hush(None).is_some(), "the hush's end lets another thread hush");
    }

    #[tokio::test]
    async fn an_awake_reader_is_not_hushed() {
        let w = watching(false).await;
        drop(w.watched.hush(None).expect("nobody else hushes"));
        // It never said it sleeps: the hush's end must not say so for it.
        w.write.try_write(b"one").expect("room");
        assert_eq!(w.read.rings_since_asked(), 0, "a reader that never slept was rung");
        assert_eq!(w.wakes(), 0);
        assert!(w.watched.any_unread(u64::MAX) && !w.watched.any_unread(w.registered.number()));
    }

    #[tokio::test]
    async fn bells_owed_in_a_pass_ring_when_it_ends() {
        let w = watching(true).await;
        w.sleep();
        bells_after(|| {
            w.write.try_write(b"one").expect("room");
            bells_after(|| w.write.try_write(b"two").expect("room"));
            assert_eq!(w.read.rings_since_asked(), 0, "rung before the pass ended");
        });
        assert_eq!(w.read.rings_since_asked(), 1, "rung once when it ended");
        // Outside a pass, at once.
        let mut buffer = [0u8; 8];
        assert_eq!(w.read.try_read(&mut buffer).expect("read"), 6);
        w.sleep();
        w.write.try_write(b"three").expect("room");
        assert_eq!(w.read.rings_since_asked(), 1);
    }

    #[tokio::test]
    async fn a_reader_woken_by_another_is_not_rung_for_bytes_owed_a_bell() {
        let w = watching(true).await;
        w.sleep();
        assert_eq!(w.watched.wake_sleepers(u64::MAX), 0, "nothing written yet");
        bells_after(|| {
            w.write.try_write(b"one").expect("room");
            assert_eq!(w.watched.wake_sleepers(w.registered.number()), 0, "its own reader is left alone");
            assert_eq!(w.watched.wake_sleepers(u64::MAX), 1, "another reader woke it");
            assert_eq!(w.watched.wake_sleepers(u64::MAX), 0, "woken once");
        });
        assert_eq!(w.wakes(), 1, "the reader's task was woken");
        assert_eq!(w.read.rings_since_asked(), 0, "rung though woken");
        let mut buffer = [0u8; 8];
        assert_eq!(w.read.try_read(&mut buffer).expect("read"), 3);
        // Asleep again: rung as before.
        w.sleep();
        w.write.try_write(b"two").expect("room");
        assert_eq!(w.read.rings_since_asked(), 1);
    }

    /// A writer thread and a reader task in ping-pong (the reader sleeps
    /// before most messages), and a thread that hushes over and over (first
    /// without looking, then looking): every message wakes the reader. A
    /// check on the races between the three; the tests above take each
    /// path one at a time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_wake_up_is_lost_under_a_busy_watcher() {
        ping_pong_beside(|watched, progress, round| {
            if let Some(hush) = watched.hush(None) {
                // For the first half the watcher never looks: bytes let in
                // unrung are then the hush's end's to see.
                let looks = if progress < MESSAGES / 2 { 0 } else { 50 };
                for _ in 0..looks {
                    if hush.wake_unread() {
                        break;
                    }
                    std::hint::spin_loop();
                }
                spin(round);
            }
        })
        .await;
    }

    /// The same with the writer's bells rung after each write's pass and
    /// another reader of the process waking the sleeper over and over.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_wake_up_is_lost_beside_readers_that_wake_each_other() {
        ping_pong_beside(|watched, _, round| {
            watched.wake_sleepers(u64::MAX);
            spin(round);
        })
        .await;
    }

    const MESSAGES: u64 = 5_000;

    /// A while that differs from one round of a watcher to the next.
    fn spin(round: u32) {
        for _ in 0..round % 500 {
            std::hint::spin_loop();
        }
    }

    /// The ping-pong, with `watcher` called over and over by a thread of its
    /// own (with the messages read so far and its round), and every other
    /// message written inside a [`bells_after`].
    async fn ping_pong_beside(watcher: fn(&Watched, u64, u32)) {
        let Watching { read, write, watched, registered: _registered, .. } = watching(false).await;
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(AtomicU64::new(0));
        let watcher = {
            let (stop, progress) = (stop.clone(), progress.clone());
            std::thread::spawn(move || {
                let mut round = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    round = round.wrapping_add(1);
                    watcher(watched, progress.load(Ordering::Relaxed), round);
                    std::thread::yield_now();
                }
            })
        };
        let writer = {
            let progress = progress.clone();
            std::thread::spawn(move || {
                for n in 0..MESSAGES {
                    let written = || write.try_write(&n.to_le_bytes()).expect("room");
                    if n % 2 == 0 {
                        bells_after(written)
                    } else {
                        written()
                    };
                    let sent = std::time::Instant::now();
                    while progress.load(Ordering::Acquire) <= n && sent.elapsed() < Duration::from_secs(20) {
                        std::thread::yield_now();
                    }
                    // Time for the reader to find its ring empty and sleep.
                    std::thread::sleep(Duration::from_micros(20));
                }
            })
        };
        let mut got = Vec::new();
        while got.len() < 8 * MESSAGES as usize {
            let mut buffer = [0u8; 8];
            let mut buf = ReadBuf::new(&mut buffer[..8 - got.len() % 8]);
            let reading = std::future::poll_fn(|cx| read.poll_read(cx, &mut buf));
            let read = tokio::time::timeout(Duration::from_secs(10), reading).await;
            read.unwrap_or_else(|_| panic!("message {} never woke its reader", got.len() / 8)).expect("read");
            got.extend_from_slice(buf.filled());
            progress.store(got.len() as u64 / 8, Ordering::Release);
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().expect("writer");
        watcher.join().expect("watcher");
        let expected: Vec<u8> = (0..MESSAGES).flat_map(u64::to_le_bytes).collect();
        assert!(got == expected, "bytes out of order or lost");
    }
}
