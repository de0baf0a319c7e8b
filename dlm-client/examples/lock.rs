//! Takes a lock through the local agent, prints its fencing token and lets
//! it go: `cargo run -p dlm-client --example lock -- [SOCKET] [NAME]`
//! (`/run/dlm/dlm.sock` and `orders/42` by default). The test command runs
//! [`take_lock`] against a real agent (`tests/clients.rs`).

use dlm_client::{Client, LockOptions, Mode, Target};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let socket = args.next().unwrap_or_else(|| "/run/dlm/dlm.sock".into());
    let name = args.next().unwrap_or_else(|| "orders/42".into());
    let token = take_lock(&socket, &name).await?;
    println!("held {name} with token {token}");
    Ok(())
}

/// Takes `name` in EX through the agent on the Unix socket `socket`, lets it
/// go, and returns the fencing token it was held under.
///
/// # Errors
/// The agent cannot be reached, or refused the lock.
pub async fn take_lock(socket: &str, name: &str) -> Result<u64, Box<dyn std::error::Error>> {
    let client = Client::connect(&Target::Unix(socket.into())).await?;
    let session = client.session().await?;
    let guard = session.lock("default", name, Mode::Ex, LockOptions::default()).await?;
    // Pass the fencing token to the storage you write to, so it can refuse a
    // writer that has lost the lock since.
    let token = guard.fencing_token();
    guard.unlock().await?;
    Ok(token)
}
