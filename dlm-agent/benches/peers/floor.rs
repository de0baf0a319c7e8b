//! The floor: a 16-byte Unix-socket ping-pong between this process and a
//! child of it, in the placement being measured.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

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
        let mut trips = Vec::with_capacity(count);
        for _ in 0..count {
            let start = Instant::now();
            stream.write_all(&buffer)?;
            stream.read_exact(&mut buffer)?;
            trips.push(start.elapsed().as_secs_f64() * 1e6);
        }
        trips.sort_by(f64::total_cmp);
        Ok(trips[trips.len() / 2])
    })
    .await?;
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// The argument that makes this binary the echo server of [`unix_round_trips`].
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
