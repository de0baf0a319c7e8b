//! The watchdog that backs self-fencing (`[cluster.fencing] watchdog`): a
//! device such as softdog's `/dev/watchdog`, written to once a second only
//! while this node is a member of a quorate view **and** its corosync
//! answers. A node that stops being either — cut off, its corosync frozen
//! or gone, the agent stopped — stops feeding the device, and the kernel
//! resets the machine when the device's timeout runs out. So a node that
//! cannot tell it was cut off (a frozen corosync never says so) is still
//! gone before the survivors' `self_fence_grace` ends, if the device's
//! timeout is shorter than the grace.
//!
//! The feeding runs on its own thread, and asks corosync's quorum service
//! for its word each time: a frozen corosync blocks that call, and the
//! thread with it, which is the point. A clean stop writes the magic `V`
//! that disarms the device (Linux's watchdog API); a crash does not.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::Duration;

use rust_corosync::quorum;

use super::realtime::Realtime;

/// How often the device is fed.
const FEED_INTERVAL: Duration = Duration::from_secs(1);
/// How often the thread looks for a disarm.
const TICK: Duration = Duration::from_millis(50);

/// The running watchdog: what the membership tells it, and how to disarm it.
#[derive(Clone)]
pub struct Watchdog {
    /// Whether this node is a member of a quorate view now.
    member: Arc<AtomicBool>,
    /// Set on a clean stop: the thread writes the magic `V` and stops.
    disarm: Arc<AtomicBool>,
    /// Told when the device is disarmed.
    disarmed: Arc<Mutex<mpsc::Receiver<()>>>,
}

impl Watchdog {
    /// Opens `device` and starts feeding it while [`Watchdog::member`] says so.
    ///
    /// # Errors
    /// The device cannot be opened (softdog not loaded, no permission), or
    /// the thread cannot be made.
    pub fn start(device: &Path, realtime: &Realtime) -> Result<Watchdog, String> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(device)
            .map_err(|e| format!("cannot open the watchdog {}: {e} (is softdog loaded?)", device.display()))?;
        let (done, disarmed) = mpsc::channel();
        let watchdog =
            Watchdog { member: Arc::default(), disarm: Arc::default(), disarmed: Arc::new(Mutex::new(disarmed)) };
        let (member, disarm, device) = (watchdog.member.clone(), watchdog.disarm.clone(), device.to_path_buf());
        let realtime = realtime.clone();
        std::thread::Builder::new()
            .name("dlm-watchdog".into())
            .spawn(move || {
                let _realtime = realtime.enter("dlm-watchdog");
                feed(file, &device, &member, &disarm);
                let _ = done.send(());
            })
            .map_err(|e| e.to_string())?;
        Ok(watchdog)
    }

    /// This node is (or is no longer) a member of a quorate view.
    pub fn member(&self, quorate_member: bool) {
        self.member.store(quorate_member, Ordering::Release);
    }

    /// A clean stop: disarms the device, waiting a moment for it to be done
    /// (not when the thread is blocked on a frozen corosync: then the
    /// machine is reset, as it would be anyway).
    pub fn disarm(&self) {
        self.disarm.store(true, Ordering::Release);
        let disarmed = self.disarmed.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = disarmed.recv_timeout(Duration::from_secs(1));
    }
}

fn feed(mut file: std::fs::File, device: &Path, member: &AtomicBool, disarm: &AtomicBool) {
    let mut quorum_handle = None;
    let mut feeding = false;
    let ticks_per_feed = (FEED_INTERVAL.as_millis() / TICK.as_millis()).max(1);
    let mut tick = 0u128;
    loop {
        std::thread::sleep(TICK);
        if disarm.load(Ordering::Acquire) {
            let _ = file.write_all(b"V").and_then(|()| file.flush());
            tracing::info!(device = %device.display(), "watchdog disarmed");
            return;
        }
        tick += 1;
        if !tick.is_multiple_of(ticks_per_feed) {
            continue;
        }
        let ok = member.load(Ordering::Acquire) && corosync_answers(&mut quorum_handle);
        if ok && let Err(error) = file.write_all(b"\0").and_then(|()| file.flush()) {
            tracing::error!(device = %device.display(), %error, "cannot feed the watchdog");
        }
        if ok != feeding {
            if ok {
                tracing::info!(device = %device.display(), "feeding the watchdog: a member of a quorate view");
            } else {
                tracing::warn!(device = %device.display(), "not feeding the watchdog: not a quorate member, or corosync silent; the machine resets when it runs out");
            }
            feeding = ok;
        }
    }
}

/// Whether corosync's quorum service answers and says quorate (connecting
/// again after an error). Blocks while corosync is frozen.
fn corosync_answers(handle: &mut Option<quorum::Handle>) -> bool {
    if handle.is_none() {
        let model = quorum::ModelData::ModelV1(quorum::Model1Data {
            flags: quorum::Model1Flags::None,
            quorum_notification_fn: None,
            nodelist_notification_fn: None,
        });
        *handle = quorum::initialize(&model, 0).ok().map(|(h, _)| h);
    }
    match handle.as_ref().map(quorum::getquorate) {
        Some(Ok(quorate)) => quorate,
        _ => {
            *handle = None;
            false
        }
    }
}
