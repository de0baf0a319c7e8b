//! The lockspace calls libdlm makes on the kernel's control device, made
//! on the agent's admin API instead (gRPC on the same socket, through the
//! Rust client on a runtime of the call's own: they are rare).

use std::ffi::c_int;

use dlm_client::{Client, ClientError, Target};

use crate::session::socket_path;
use crate::translate;

/// Runs `call` against the agent on a fresh single-threaded runtime.
fn with_client<T>(call: impl AsyncFnOnce(&Client) -> Result<T, ClientError>) -> Result<T, c_int> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|_| libc::EAGAIN)?;
    runtime.block_on(async {
        let client = Client::connect(&Target::Unix(socket_path())).await.map_err(errno)?;
        call(&client).await.map_err(errno)
    })
}

/// The `errno` for a failed call: the refusal's code, which the agent puts
/// first in the status message (`code: message`).
fn errno(error: ClientError) -> c_int {
    match error {
        ClientError::Call(status) => translate::refusal(status.message().split(':').next().unwrap_or_default()),
        ClientError::Unreachable { .. } => libc::ECONNREFUSED,
        ClientError::SessionClosed => translate::LOST,
    }
}

/// Creates lockspace `name` (value blocks of libdlm's length).
///
/// # Errors
/// It exists (`EEXIST`), the name is invalid (`EINVAL`), the caller may not
/// (`EPERM`), or the agent is not there.
pub fn create(name: &str) -> Result<(), c_int> {
    let lvb_len = u32::try_from(crate::abi::DLM_LVB_LEN).unwrap_or(32);
    with_client(async |client| client.create_lockspace(name, lvb_len).await)
}

/// Whether lockspace `name` exists.
///
/// # Errors
/// The agent is not there.
pub fn exists(name: &str) -> Result<bool, c_int> {
    let reply = with_client(async |client| client.lockspaces().await)?;
    Ok(reply.lockspaces.iter().any(|lockspace| lockspace.name == name))
}

/// Releases lockspace `name`; with `force`, even with locks in it.
///
/// # Errors
/// As the agent refuses it.
pub fn release(name: &str, force: bool) -> Result<(), c_int> {
    with_client(async |client| client.release_lockspace(name, force).await)
}

/// The orphan locks of lockspace `name` whose process was `pid` (every
/// orphan for 0): each resource's name and the mode it is held in.
///
/// # Errors
/// As the agent refuses the dump.
pub fn orphans(name: &str, pid: i32) -> Result<Vec<(Vec<u8>, i32)>, c_int> {
    let resources = with_client(async |client| client.dump_all(name, None, 0, |_| {}).await)?;
    let mut orphans = Vec::new();
    for resource in resources {
        for lock in resource.granted.iter().filter(|lock| lock.orphan && (pid == 0 || lock.pid == pid)) {
            if let Some(mode) = lock.granted {
                orphans.push((resource.name.clone(), mode));
            }
        }
    }
    Ok(orphans)
}
