//! How a session's rings reach the client: the agent makes the memfd and
//! the bells and passes them over the session's socket (`SCM_RIGHTS`),
//! after a one-byte mark that says whether the session goes through rings
//! or stays on its socket.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;

use tokio::io::unix::AsyncFd;

use super::{MAP_LEN, Mapping, Ring, RingHalves, RingRead, RingWrite, TO_AGENT, TO_CLIENT, registered};

/// What the agent's first byte on a session that asked for rings says:
/// the rings and bells are passed with it.
const MARK_RING: u8 = b'R';
/// The session goes on over the socket (no ring to spare).
const MARK_SOCKET: u8 = b'S';

/// The agent's side: when `rings` says so, makes the rings and bells and
/// passes them to the client over `socket`; else (or when they cannot be
/// made) tells it that the session stays on the socket.
///
/// # Errors
/// The socket failed.
pub fn offer(socket: StdUnixStream, rings: bool) -> io::Result<RingHalves> {
    socket.set_nonblocking(true)?;
    let made = if rings { make().ok() } else { None };
    let socket = Arc::new(registered(socket)?);
    let Some((memfd, map, agent_bell, client_bell)) = made else {
        send_marked(socket.get_ref(), MARK_SOCKET, &[])?;
        return Ok(RingHalves { read: None, write: None, socket });
    };
    send_marked(socket.get_ref(), MARK_RING, &[memfd.as_raw_fd(), agent_bell.as_raw_fd(), client_bell.as_raw_fd()])?;
    // The mapping outlives the descriptor.
    drop(memfd);
    ring_halves(map, socket, (TO_AGENT, agent_bell), (TO_CLIENT, client_bell))
}

/// One side's halves: it reads the ring at `reads.0`, waking on the bell
/// `reads.1`, and writes the ring at `writes.0`, ringing `writes.1`.
fn ring_halves(
    map: Arc<Mapping>,
    socket: Arc<AsyncFd<StdUnixStream>>,
    reads: (usize, OwnedFd),
    writes: (usize, OwnedFd),
) -> io::Result<RingHalves> {
    Ok(RingHalves {
        read: Some(RingRead {
            ring: Ring { map: map.clone(), at: reads.0 },
            head: AtomicU32::new(0),
            bell: registered(reads.1)?,
            waker: Arc::default(),
            socket: socket.clone(),
        }),
        write: Some(RingWrite { ring: Ring { map, at: writes.0 }, tail: AtomicU32::new(0), bell: Arc::new(writes.1) }),
        socket,
    })
}

/// The memfd (sealed at its size), its mapping, and the two bells.
fn make() -> io::Result<(OwnedFd, Arc<Mapping>, OwnedFd, OwnedFd)> {
    let memfd = memfd()?;
    let map = Arc::new(Mapping::map(&memfd)?);
    Ok((memfd, map, eventfd()?, eventfd()?))
}

/// The client's side: takes the rings and bells the agent passed, or goes
/// on over the socket when it says so.
///
/// # Errors
/// The socket failed or closed, or what the agent passed is not a ring.
pub async fn accept(socket: StdUnixStream) -> io::Result<RingHalves> {
    socket.set_nonblocking(true)?;
    let socket = Arc::new(registered(socket)?);
    let (mark, fds) = loop {
        let mut ready = socket.readable().await?;
        match recv_marked(socket.get_ref()) {
            Ok(got) => break got,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => ready.clear_ready(),
            Err(error) => return Err(error),
        }
    };
    match (mark, fds) {
        (MARK_SOCKET, None) => Ok(RingHalves { read: None, write: None, socket }),
        (MARK_RING, Some([memfd, agent_bell, client_bell])) => {
            // SAFETY: fstat into a zeroed struct, on an open descriptor.
            let mut stat: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            let size = unsafe { libc::fstat(memfd.as_raw_fd(), &raw mut stat) };
            if size != 0 || usize::try_from(stat.st_size).unwrap_or(0) < MAP_LEN {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "the agent's ring is too small"));
            }
            let map = Arc::new(Mapping::map(&memfd)?);
            ring_halves(map, socket, (TO_CLIENT, client_bell), (TO_AGENT, agent_bell))
        }
        _ => Err(io::Error::new(io::ErrorKind::InvalidData, "the agent answered the ring preface with neither")),
    }
}

/// Sends one byte, `mark`, with `fds` (none, or the ring's three).
fn send_marked(socket: &StdUnixStream, mark: u8, fds: &[RawFd]) -> io::Result<()> {
    let byte = [mark];
    let mut iov = libc::iovec { iov_base: byte.as_ptr() as *mut libc::c_void, iov_len: 1 };
    let payload = u32::try_from(std::mem::size_of_val(fds)).unwrap_or(0);
    // SAFETY: a size computation.
    let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &raw mut iov;
    header.msg_iovlen = 1;
    if !fds.is_empty() {
        header.msg_control = control.as_mut_ptr().cast();
        header.msg_controllen = space as _;
        // SAFETY: the control buffer has room for one header and the fds.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&raw const header);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(cmsg), payload as usize);
        }
    }
    // A new connection's socket buffer takes one byte: no waiting.
    // SAFETY: a complete header over live buffers.
    let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &raw const header, libc::MSG_NOSIGNAL) };
    if sent == 1 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Receives the agent's mark, and the three descriptors if it passed any.
fn recv_marked(socket: &StdUnixStream) -> io::Result<(u8, Option<[OwnedFd; 3]>)> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    let payload = u32::try_from(3 * std::mem::size_of::<RawFd>()).unwrap_or(0);
    // Room for more than three, so that extra descriptors are received
    // (and closed) rather than cut off.
    // SAFETY: a size computation.
    let space = unsafe { libc::CMSG_SPACE(4 * payload) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: plain data.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &raw mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.as_mut_ptr().cast();
    header.msg_controllen = space as _;
    // SAFETY: a complete header over live buffers.
    let got = unsafe { libc::recvmsg(socket.as_raw_fd(), &raw mut header, libc::MSG_CMSG_CLOEXEC) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    if got == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    // Every descriptor received is owned here, so none leaks whatever the
    // message held.
    let mut owned = Vec::new();
    // SAFETY: the kernel filled the control buffer; walk its headers.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const header);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let len = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    owned.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&raw const header, cmsg);
        }
    }
    let fds = match <[OwnedFd; 3]>::try_from(owned) {
        Ok(fds) => Some(fds),
        Err(owned) if owned.is_empty() => None,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the agent passed an unexpected number of descriptors",
            ));
        }
    };
    Ok((byte[0], fds))
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd(2) returns a new descriptor or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: new, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn memfd() -> io::Result<OwnedFd> {
    // SAFETY: a NUL-terminated name; returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"dlm-ring".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: new, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain calls on an open descriptor.
    let sized = unsafe { libc::ftruncate(fd.as_raw_fd(), MAP_LEN as libc::off_t) } == 0
        && unsafe {
            libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL)
        } == 0;
    if !sized {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}
