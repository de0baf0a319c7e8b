//! The floors: a 16-byte Unix-socket ping-pong between this process and a
//! child of it, in the placement being measured, and the same ping-pong
//! rung on a pair of eventfds (what a shared-memory ring's wake-ups would
//! cost, no bytes through the kernel).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::services::{LockHeld, LockSystem, Server};
use super::{Result, place};

/// A Unix-socket ping-pong of 16 bytes between this process and a child
/// (this binary again, as an echo server) placed on `cpus`: round trips'
/// p50 in µs. No lock service can answer faster than this in that
/// placement; a queued hand-off costs at least one (grant to the waiter, its
/// unlock back).
pub async fn unix_round_trip_p50(dir: &Path, count: usize, cpus: &[usize]) -> Result<f64> {
    let path = dir.join("echo.sock");
    let _ = std::fs::remove_file(&path);
    let mut child = Command::new(std::env::current_exe()?).arg(ECHO_SERVER).arg(&path).spawn()?;
    place(child.id(), cpus)?;
    let result = tokio::task::spawn_blocking(move || -> Result<f64> {
        use std::io::{Read, Write};
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut stream = loop {
            match std::os::unix::net::UnixStream::connect(&path) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                Err(error) => return Err(error.into()),
            }
        };
        let mut buffer = [7u8; 16];
        trips_p50(count, || {
            stream.write_all(&buffer)?;
            stream.read_exact(&mut buffer)?;
            Ok(())
        })
    })
    .await?;
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// The ping-pong of [`unix_round_trip_p50`] rung on two eventfds instead
/// of a socket: this process adds 1 to one, the child (placed on `cpus`)
/// reads it and adds 1 to the other, which this process reads. What a
/// transport that passes its bytes through shared memory and only its
/// wake-ups through the kernel would pay per round trip: round trips' p50
/// in µs.
#[allow(unsafe_code)]
pub async fn eventfd_round_trip_p50(count: usize, cpus: &[usize]) -> Result<f64> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let eventfd = || -> Result<OwnedFd> {
        // Inherited by the child (no EFD_CLOEXEC), which is told their numbers.
        // SAFETY: eventfd(2) returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: `fd` is new and owned by nothing else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let (ping, pong) = (eventfd()?, eventfd()?);
    let mut child = Command::new(std::env::current_exe()?)
        .arg(EVENTFD_ECHO)
        .arg(ping.as_raw_fd().to_string())
        .arg(pong.as_raw_fd().to_string())
        .spawn()?;
    place(child.id(), cpus)?;
    let result = tokio::task::spawn_blocking(move || {
        trips_p50(count, || {
            ring(&ping)?;
            answered(&pong)?;
            Ok(())
        })
    })
    .await?;
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Times `count` round trips made by `trip`: their p50 in µs.
fn trips_p50(count: usize, mut trip: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut trips = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        trip()?;
        trips.push(start.elapsed().as_secs_f64() * 1e6);
    }
    trips.sort_by(f64::total_cmp);
    Ok(trips[trips.len() / 2])
}

/// The argument that makes this binary the other end of [`eventfd_round_trip_p50`].
pub const EVENTFD_ECHO: &str = "--eventfd-echo";

/// Answers each ring of the eventfd `ping` with one of `pong`, until
/// reading fails (the descriptors are the parent's, inherited).
#[allow(unsafe_code)]
pub fn eventfd_echo(ping: i32, pong: i32) -> std::io::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: the parent passed these descriptors down for this process to own.
    let (ping, pong) = unsafe { (OwnedFd::from_raw_fd(ping), OwnedFd::from_raw_fd(pong)) };
    loop {
        answered(&ping)?;
        ring(&pong)?;
    }
}

/// Adds 1 to an eventfd: wakes whoever reads it.
#[allow(unsafe_code)]
fn ring(fd: &std::os::fd::OwnedFd) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer to an open descriptor.
    let written = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    if written == 8 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Waits for an eventfd to be rung, and takes its count.
#[allow(unsafe_code)]
fn answered(fd: &std::os::fd::OwnedFd) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut count = [0u8; 8];
    // SAFETY: reads 8 bytes into a live buffer from an open descriptor.
    let read = unsafe { libc::read(fd.as_raw_fd(), count.as_mut_ptr().cast(), count.len()) };
    if read == 8 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// The argument that makes this binary the echo server of [`unix_round_trip_p50`].
pub const ECHO_SERVER: &str = "--echo-server";

pub fn echo_server(path: &Path) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    let (mut stream, _) = listener.accept()?;
    let mut buffer = [0u8; 16];
    while stream.read_exact(&mut buffer).is_ok() {
        stream.write_all(&buffer)?;
    }
    Ok(())
}

/// The argument that makes this binary the many-connection echo server of
/// [`Echo`].
pub const ECHO_MANY: &str = "--echo-many";

/// The floor under the uncontended rows: the same clients (tasks of this
/// process's runtime, one connection each) each making two 16-byte round
/// trips per "pair" to a server that does nothing but echo. It locks
/// nothing; it is what this placement's sockets, wake-ups and the clients'
/// runtime allow a one-threaded server on the Unix socket.
pub struct Echo {
    pub socket: std::path::PathBuf,
}

impl LockSystem for Echo {
    type Conn = tokio::net::UnixStream;
    fn name(&self) -> &'static str {
        "echo"
    }
    async fn connect(&self) -> Result<Self::Conn> {
        Ok(tokio::net::UnixStream::connect(&self.socket).await?)
    }
    async fn lock(&self, conn: &mut Self::Conn, _: &str) -> Result<LockHeld> {
        round_trip(conn).await?;
        Ok(LockHeld::Echo)
    }
    async fn unlock(&self, conn: &mut Self::Conn, _: LockHeld) -> Result<()> {
        round_trip(conn).await
    }
}

async fn round_trip(conn: &mut tokio::net::UnixStream) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = [7u8; 16];
    conn.write_all(&buffer).await?;
    conn.read_exact(&mut buffer).await?;
    Ok(())
}

/// Starts [`echo_many`] in a child process, listening on `path`.
pub async fn start_echo(path: &Path) -> Result<Server> {
    let _ = std::fs::remove_file(path);
    let child = Command::new(std::env::current_exe()?).arg(ECHO_MANY).arg(path).spawn()?;
    let server = Server { child };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        if Instant::now() > deadline {
            return Err("the echo server never listened".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(server)
}

/// An echo server for many connections: one thread, level-triggered epoll,
/// each readable connection's bytes written straight back (16-byte
/// messages always fit the socket's buffer). Runs until killed.
#[allow(unsafe_code)]
pub fn echo_many(path: &Path) -> std::io::Result<()> {
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    // SAFETY: plain system calls on descriptors this function owns; the
    // event array outlives every epoll_wait that fills it.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epoll < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let watch = |fd: i32| {
        let mut event = libc::epoll_event { events: libc::EPOLLIN as u32, u64: fd as u64 };
        // SAFETY: as above.
        if unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut event) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    watch(listener.as_raw_fd())?;
    let mut connections: HashMap<i32, std::os::unix::net::UnixStream> = HashMap::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buffer = [0u8; 4096];
    loop {
        // SAFETY: as above.
        let ready = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as i32, -1) };
        if ready < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        for event in &events[..ready as usize] {
            let fd = event.u64 as i32;
            if fd == listener.as_raw_fd() {
                while let Ok((stream, _)) = listener.accept() {
                    stream.set_nonblocking(true)?;
                    watch(stream.as_raw_fd())?;
                    connections.insert(stream.as_raw_fd(), stream);
                }
                continue;
            }
            let Some(stream) = connections.get_mut(&fd) else { continue };
            match stream.read(&mut buffer) {
                Ok(0) => drop(connections.remove(&fd)),
                Ok(read) => {
                    if stream.write_all(&buffer[..read]).is_err() {
                        connections.remove(&fd);
                    }
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => drop(connections.remove(&fd)),
            }
        }
    }
}
