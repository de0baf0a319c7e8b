//! The command a CLI runs under a lock: it must not outlive the lock. When
//! the lock is lost it is stopped (`terminate`), and when the CLI itself
//! dies, even by SIGKILL, the kernel stops it (`end_with_parent`).
#![allow(unsafe_code)]

use std::time::Duration;

/// Asks the kernel to send the child SIGTERM when this process dies.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked exits: the CLI
/// spawns from the runtime's `block_on`, on the main thread, which lives as
/// long as the process.
pub fn end_with_parent(command: &mut std::process::Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe functions (prctl, getppid).
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(command, move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent died between fork and prctl: no signal will come.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(std::io::Error::other("the dlm-agent lock process exited"));
            }
            Ok(())
        });
    }
}

/// SIGTERM, then SIGKILL if the child has not exited after `grace`; waits
/// for it either way.
pub async fn terminate(child: &mut tokio::process::Child, grace: Duration) {
    if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
        // SAFETY: kill(2) on our own child's pid, which stays reserved until
        // we reap it below.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        eprintln!("dlm-agent: the command did not exit within {grace:?} of SIGTERM: SIGKILL");
        let _ = child.kill().await;
    }
}
