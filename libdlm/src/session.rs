//! A framed session with the local agent, without an async runtime: a
//! blocking Unix socket, written under a lock by the calling threads and
//! read by a thread of the library's own (which answers the agent's pings).

use std::ffi::c_int;
use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Mutex;

use dlm_proto::framing::{self, Frame, FrameKind};
use dlm_proto::proto::{self, server_message::Body};

use crate::translate;

/// Where the agent is: `DLM_SOCKET`, or the clients' default.
#[must_use]
pub fn socket_path() -> PathBuf {
    std::env::var_os("DLM_SOCKET").map_or_else(dlm_client::default_socket, PathBuf::from)
}

/// The write side of a session.
#[derive(Debug)]
pub struct Sender {
    stream: Mutex<UnixStream>,
}

/// The read side, for the reader thread.
#[derive(Debug)]
pub struct Receiver {
    stream: BufReader<UnixStream>,
    body: Vec<u8>,
}

/// Opens a session on the agent's socket: its two sides, once welcomed.
///
/// # Errors
/// The `errno` for why: the agent is not there (`ECONNREFUSED`, `ENOENT`),
/// or refused the session (its code's `errno`).
pub fn open() -> Result<(Sender, Receiver), c_int> {
    let errno = |error: std::io::Error| error.raw_os_error().unwrap_or(libc::EIO);
    let mut stream = UnixStream::connect(socket_path()).map_err(errno)?;
    stream.write_all(&framing::PREFACE).map_err(errno)?;
    let reader = stream.try_clone().map_err(errno)?;
    let mut receiver =
        Receiver { stream: BufReader::with_capacity(framing::READ_BUFFER_LEN, reader), body: Vec::new() };
    // The agent's first frame is the welcome, or the refusal of the session.
    match framing::read_frame_blocking::<proto::ServerMessage>(&mut receiver.stream, &mut receiver.body) {
        Ok(Frame::Message(proto::ServerMessage { body: Some(Body::Welcome(_)) })) => {
            Ok((Sender { stream: Mutex::new(stream) }, receiver))
        }
        Ok(Frame::Message(proto::ServerMessage { body: Some(Body::Rejected(refused)) })) => {
            Err(translate::refusal(&refused.code))
        }
        _ => Err(libc::EPROTO),
    }
}

impl Sender {
    /// Sends one request.
    ///
    /// # Errors
    /// The session is gone (`ENOTCONN`).
    pub fn send(&self, body: proto::client_message::Body) -> Result<(), c_int> {
        let mut frame = Vec::new();
        framing::encode_message(&proto::ClientMessage { body: Some(body) }, &mut frame);
        self.write(&frame)
    }

    fn write(&self, frame: &[u8]) -> Result<(), c_int> {
        let mut stream = self.stream.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        stream.write_all(frame).map_err(|_| translate::LOST)
    }

    /// Ends the session: the reader sees the end, the agent ends the
    /// session (persistent locks become orphans, the others are released).
    pub fn close(&self) {
        let stream = self.stream.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
}

impl Receiver {
    /// The agent's next message, answering its pings through `sender`.
    pub fn next_answering(&mut self, sender: &Sender) -> Option<Body> {
        loop {
            match framing::read_frame_blocking::<proto::ServerMessage>(&mut self.stream, &mut self.body) {
                Ok(Frame::Message(proto::ServerMessage { body: Some(body) })) => return Some(body),
                Ok(Frame::Message(_) | Frame::Pong) => {}
                Ok(Frame::Ping) => {
                    let mut pong = Vec::new();
                    framing::encode_control(FrameKind::Pong, &mut pong);
                    let _ = sender.write(&pong);
                }
                Err(_) => return None,
            }
        }
    }
}
