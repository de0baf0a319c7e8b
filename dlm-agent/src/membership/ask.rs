//! What the membership asks its corosync outside the callbacks: its
//! timeouts, read at start and again while it runs (a reload of
//! corosync.conf may change them), and the lease's confirmations, asked on
//! a thread of their own (see [`crate::lease`] for why and how they are used).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rust_corosync::{cmap, quorum};

use super::realtime::Realtime;
use crate::lease::{Lease, Timing};

/// Reads the running corosync's token and consensus timeouts (cmap's
/// `runtime.config.totem.*`, which include `token_coefficient`).
///
/// # Errors
/// corosync cannot be reached, or does not say.
pub fn read_timing() -> Result<Timing, String> {
    TimingReader::default().read()
}

/// A connection to cmap kept for reading the timeouts again and again.
///
/// Why kept: each connection to corosync maps libqb's shared-memory rings
/// (3 MiB here), and the agent locks every new mapping as it is made
/// (`[memory] resident`), so one connection a second made the agent take
/// about 770 pages a second, each charged to its memory cgroup: under
/// memory pressure, reclaim on the membership path (seen with bpftrace on
/// `mmap`, issue 31). Made again only after an error (corosync restarted).
#[derive(Default)]
struct TimingReader {
    handle: Option<cmap::Handle>,
}

impl TimingReader {
    fn read(&mut self) -> Result<Timing, String> {
        let handle = match &mut self.handle {
            Some(handle) => handle,
            empty @ None => empty.insert(
                cmap::initialize(cmap::Map::Icmap)
                    .map_err(|e| format!("cannot read corosync's timeouts from cmap ({e}); is corosync running?"))?,
            ),
        };
        let millis = |key: &str| match cmap::get(handle, key) {
            Ok(cmap::Data::UInt32(ms)) => Ok(Duration::from_millis(u64::from(ms))),
            Ok(_) => Err(format!("corosync's {key} is not a number")),
            Err(e) => Err(format!("cannot read corosync's {key}: {e}")),
        };
        let timing = millis("runtime.config.totem.token")
            .and_then(|token| Ok(Timing { token, consensus: millis("runtime.config.totem.consensus")? }));
        if timing.is_err() {
            self.close();
        }
        timing
    }

    fn close(&mut self) {
        if let Some(handle) = self.handle.take() {
            let _ = cmap::finalize(&handle);
        }
    }
}

impl Drop for TimingReader {
    fn drop(&mut self) {
        self.close();
    }
}

/// How often corosync's timeouts are read again: a reload of corosync.conf
/// (`corosync-cfgtool -R`) changes them with no callback.
const TIMING_RECHECK: Duration = Duration::from_secs(1);

/// Asks corosync every quarter of the lease's bound, on a thread of its
/// own, and confirms the lease with each answer. A question that blocks (a
/// stopped corosync) confirms nothing until it returns, and then only as of
/// when it was asked. Nothing else runs on this thread: whatever else may
/// block (reading cmap, telling the membership) would delay confirmations
/// and lapse the lease of a healthy node.
///
/// # Errors
/// The thread cannot be made.
pub fn spawn_lease_asker(lease: Arc<Lease>, realtime: Realtime) -> Result<(), String> {
    std::thread::Builder::new()
        .name("dlm-lease".into())
        .spawn(move || {
            let _realtime = realtime.enter("dlm-lease");
            loop {
                let model = quorum::ModelData::ModelV1(quorum::Model1Data {
                    flags: quorum::Model1Flags::None,
                    quorum_notification_fn: None,
                    nodelist_notification_fn: None,
                });
                if let Ok((handle, _)) = quorum::initialize(&model, 0) {
                    loop {
                        let asked = Instant::now();
                        // Any answer confirms: corosync runs. Whether it is
                        // quorate is the quorum callbacks' to act on.
                        if quorum::getquorate(&handle).is_err() {
                            break;
                        }
                        lease.confirm(asked);
                        std::thread::sleep(lease.ask_every());
                    }
                    let _ = quorum::finalize(&handle);
                }
                std::thread::sleep(lease.ask_every());
            }
        })
        .map(drop)
        .map_err(|e| format!("cannot start the lease thread: {e}"))
}

/// Reads corosync's timeouts every [`TIMING_RECHECK`], on a thread of its
/// own (a read may block while corosync is busy); when they changed, the
/// lease takes its new bound at once and `changed` is told (the membership
/// recomputes the grace).
///
/// # Errors
/// The thread cannot be made.
pub fn spawn_timing_watch(
    lease: Arc<Lease>,
    mut timing: Timing,
    changed: impl Fn(Timing) + Send + 'static,
) -> Result<(), String> {
    std::thread::Builder::new()
        .name("dlm-timing".into())
        .spawn(move || {
            let mut reader = TimingReader::default();
            loop {
                std::thread::sleep(TIMING_RECHECK);
                if let Ok(now) = reader.read()
                    && now != timing
                {
                    timing = now;
                    lease.set_bound(timing.bound());
                    changed(timing);
                }
            }
        })
        .map(drop)
        .map_err(|e| format!("cannot start the timing thread: {e}"))
}
