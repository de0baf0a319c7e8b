//! One open lockspace: its session with the agent, its locks (by lock id,
//! which is also the request's handle on the wire), and the delivery of
//! their callbacks.
//!
//! ```text
//!  program ──lock/unlock──▶ Lockspace ──Sender──▶ agent
//!                              ▲                    │
//!                              └── reader thread ◀──┘ completions, blocking callbacks
//!                                     │
//!            a waiting call ◀─────────┤ (its status block written, it wakes)
//!            Deliveries ◀─────────────┘ queued for dlm_dispatch (the fd is readable),
//!                                       or run by the AST thread (dlm_ls_pthread_init)
//! ```
//!
//! A status block is written only where libdlm writes it: just before its
//! completion callback runs (on the thread that runs it), or before a
//! waiting call returns; never behind the program's back.

use std::collections::{HashMap, VecDeque};
use std::ffi::{c_int, c_void};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::thread::{JoinHandle, ThreadId};

use dlm_proto::proto::{self, client_message, server_message::Body};

use crate::abi::{self, CPtr, Call, DLM_LVB_LEN, DlmLksb, EINPROG};
use crate::session::{self, Receiver, Sender};
use crate::translate::{self, LOST};

/// An open lockspace.
pub struct Lockspace {
    /// Its name.
    pub name: String,
    sender: Sender,
    table: Mutex<Table>,
    delivery: Mutex<Delivery>,
    /// Readable while callbacks wait for `dlm_dispatch`.
    event_fd: OwnedFd,
    reader: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
struct Table {
    next_lkid: u32,
    locks: HashMap<u32, Entry>,
    /// The session ended: no more requests.
    over: bool,
    /// The program closed the lockspace: nothing more is delivered.
    closing: bool,
}

/// What the library knows of one lock.
struct Entry {
    completion: Call,
    blocking: Call,
    lksb: CPtr<DlmLksb>,
    /// Copy the value block into the status block on completion.
    valblk: bool,
    /// A request (or an unlock) is in flight.
    pending: bool,
    /// Granted (in some mode): a refused conversion leaves it held.
    held: bool,
    /// The synchronous calls waiting for this request's outcome: its own,
    /// and a waiting cancel of it (made on another thread).
    waiters: Vec<Arc<Waiter>>,
    /// A cancel that completes as something else (`dlm_ls_deadlock_cancel`).
    cancel_status: Option<c_int>,
}

/// Where callbacks go.
enum Delivery {
    /// Queued for `dlm_dispatch`.
    Queue(VecDeque<Pending>),
    /// Run by the AST thread.
    Thread { queue: mpsc::Sender<Pending>, thread: Option<JoinHandle<()>>, id: ThreadId },
}

/// A callback to run, with the status block to write first.
pub struct Pending {
    update: Option<Update>,
    call: Call,
}

impl Pending {
    fn run(self) {
        if let Some(update) = self.update {
            update.apply();
        }
        self.call.run();
    }
}

/// What a completion writes into the program's status block.
struct Update {
    lksb: CPtr<DlmLksb>,
    status: c_int,
    lkid: u32,
    flags: u8,
    lvb: Option<Vec<u8>>,
}

impl Update {
    fn apply(&self) {
        if self.lksb.0.is_null() {
            return;
        }
        // SAFETY: the program gave this status block for this request and
        // keeps it valid until its completion (libdlm's contract); the
        // value block pointer is its, `DLM_LVB_LEN` bytes.
        unsafe {
            let lksb = &mut *self.lksb.0;
            lksb.sb_status = self.status;
            lksb.sb_lkid = self.lkid;
            lksb.sb_flags = self.flags as std::ffi::c_char;
            if let Some(lvb) = &self.lvb
                && !lksb.sb_lvbptr.is_null()
            {
                let out = std::slice::from_raw_parts_mut(lksb.sb_lvbptr.cast::<u8>(), DLM_LVB_LEN);
                let n = lvb.len().min(DLM_LVB_LEN);
                out[..n].copy_from_slice(&lvb[..n]);
                out[n..].fill(0);
            }
        }
    }
}

/// A synchronous call's wait for its request's outcome.
#[derive(Default)]
pub struct Waiter {
    status: Mutex<Option<c_int>>,
    done: Condvar,
}

impl Waiter {
    fn finish(&self, status: c_int) {
        *self.status.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(status);
        self.done.notify_all();
    }

    /// Waits for the outcome: the status also written in the status block.
    pub fn wait(&self) -> c_int {
        let mut status = self.status.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            if let Some(status) = *status {
                return status;
            }
            status = self.done.wait(status).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

/// A lock or conversion request, as `dlm_ls_lock` takes it.
pub struct LockRequest<'a> {
    /// `LKM_*MODE`.
    pub mode: u32,
    /// `LKF_*`.
    pub flags: u32,
    /// The resource (new requests).
    pub name: &'a [u8],
    /// The program's status block.
    pub lksb: CPtr<DlmLksb>,
    /// Completion callback.
    pub completion: Call,
    /// Blocking callback.
    pub blocking: Call,
    /// A synchronous call: the outcome goes to a waiter, not a callback.
    pub wait: bool,
}

/// An unlock or cancel, as `dlm_ls_unlock` takes it.
pub struct UnlockRequest {
    /// The lock.
    pub lkid: u32,
    /// `LKF_CANCEL`, `LKF_FORCEUNLOCK`, `LKF_VALBLK`, `LKF_IVVALBLK`.
    pub flags: u32,
    /// A status block to complete instead of the lock's (if not null).
    pub lksb: CPtr<DlmLksb>,
    /// An argument for the completion callback instead of the lock's (if not null).
    pub astarg: CPtr<c_void>,
    /// A synchronous call.
    pub wait: bool,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Lockspace {
    /// Opens a session on the agent for lockspace `name` and starts its reader.
    ///
    /// # Errors
    /// The session could not be opened (its `errno`).
    pub fn open(name: &str) -> Result<Arc<Lockspace>, c_int> {
        let (sender, receiver) = session::open()?;
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EMFILE));
        }
        // SAFETY: `fd` is ours, just made.
        let event_fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let lockspace = Arc::new(Lockspace {
            name: name.to_string(),
            sender,
            table: Mutex::new(Table { next_lkid: 1, ..Table::default() }),
            delivery: Mutex::new(Delivery::Queue(VecDeque::new())),
            event_fd,
            reader: Mutex::new(None),
        });
        let weak = Arc::downgrade(&lockspace);
        let reader = std::thread::Builder::new()
            .name("dlm-reader".into())
            .spawn(move || read(&weak, receiver))
            .map_err(|_| libc::EAGAIN)?;
        *locked(&lockspace.reader) = Some(reader);
        Ok(lockspace)
    }

    /// The descriptor a polling program waits on (`dlm_ls_get_fd`).
    #[must_use]
    pub fn fd(&self) -> RawFd {
        self.event_fd.as_raw_fd()
    }

    /// Sends a lock or conversion request; a synchronous one's waiter.
    ///
    /// # Errors
    /// The `errno` libdlm returns for it (nothing was sent).
    pub fn lock(&self, request: &LockRequest<'_>) -> Result<Option<Arc<Waiter>>, c_int> {
        let flags = request.flags;
        translate::check_lock(request.mode, flags)?;
        if request.lksb.0.is_null() || (request.completion.function.is_none() && !request.wait) {
            return Err(libc::EINVAL);
        }
        // SAFETY: the program's status block, not null (checked above).
        let lksb = unsafe { &mut *request.lksb.0 };
        let valblk = flags & abi::LKF_VALBLK != 0;
        if valblk && lksb.sb_lvbptr.is_null() {
            return Err(libc::EINVAL);
        }
        let convert = flags & abi::LKF_CONVERT != 0;
        if !convert && (request.name.is_empty() || request.name.len() > abi::DLM_RESNAME_MAXLEN) {
            return Err(libc::EINVAL);
        }
        let waiter = request.wait.then(|| Arc::new(Waiter::default()));
        let mut table = locked(&self.table);
        if table.over {
            return Err(LOST);
        }
        let entry = Entry {
            completion: request.completion,
            blocking: request.blocking,
            lksb: request.lksb,
            valblk,
            pending: true,
            held: convert,
            waiters: waiter.iter().cloned().collect(),
            cancel_status: None,
        };
        let lkid = if convert {
            let lkid = lksb.sb_lkid;
            match table.locks.get_mut(&lkid) {
                None if lkid == 0 => return Err(libc::EINVAL),
                None => return Err(libc::ENOENT),
                Some(held) if held.pending => return Err(libc::EBUSY),
                Some(held) => *held = entry,
            }
            lkid
        } else {
            let lkid = table.new_lkid();
            table.locks.insert(lkid, entry);
            lksb.sb_lkid = lkid;
            lkid
        };
        lksb.sb_status = EINPROG;
        let wire_flags = translate::lock_flags(flags);
        let body = if convert {
            client_message::Body::Convert(proto::Convert {
                handle: u64::from(lkid),
                mode: translate::mode(request.mode),
                flags: wire_flags,
                lvb: valblk.then(|| read_lvb(lksb)),
                ..proto::Convert::default()
            })
        } else {
            client_message::Body::Lock(proto::Lock {
                handle: u64::from(lkid),
                lockspace: self.name.clone(),
                name: request.name.to_vec(),
                mode: translate::mode(request.mode),
                flags: wire_flags,
                ..proto::Lock::default()
            })
        };
        // Sent under the table's lock: the reply finds the entry, and
        // requests leave in the order they were made.
        if let Err(errno) = self.sender.send(body) {
            if convert {
                if let Some(held) = table.locks.get_mut(&lkid) {
                    held.pending = false;
                    held.waiters.clear();
                }
            } else {
                table.locks.remove(&lkid);
            }
            return Err(errno);
        }
        Ok(waiter)
    }

    /// Sends an unlock or a cancel; a synchronous one's waiter. `Ok(None)`
    /// for a cancel with nothing to cancel: done at once, without a
    /// callback, as the kernel does.
    ///
    /// # Errors
    /// The `errno` libdlm returns for it.
    pub fn unlock(&self, request: &UnlockRequest) -> Result<Option<Arc<Waiter>>, c_int> {
        if request.lkid == 0 {
            return Err(libc::EINVAL);
        }
        let cancel = request.flags & abi::LKF_CANCEL != 0;
        let force = request.flags & abi::LKF_FORCEUNLOCK != 0;
        let waiter = request.wait.then(|| Arc::new(Waiter::default()));
        let mut table = locked(&self.table);
        if table.over {
            return Err(LOST);
        }
        let entry = table.locks.get_mut(&request.lkid).ok_or(libc::ENOENT)?;
        if cancel && !entry.pending {
            return Ok(None);
        }
        if !cancel && entry.pending && !force {
            return Err(libc::EBUSY);
        }
        if !request.lksb.0.is_null() {
            entry.lksb = request.lksb;
        }
        if !request.astarg.0.is_null() {
            entry.completion.arg = request.astarg;
        }
        // A cancel completes the pending request: whoever waits for that
        // request (a waiting lock call on another thread) still wakes, and a
        // waiting cancel with it. An unlock's outcome is its own.
        if !cancel {
            entry.waiters.clear();
        }
        entry.waiters.extend(waiter.iter().cloned());
        let handle = u64::from(request.lkid);
        let body = if cancel {
            client_message::Body::Cancel(proto::Cancel { handle })
        } else {
            entry.pending = true;
            let flags = translate::unlock_flags(request.flags);
            let writes = flags & proto::UnlockFlag::UnlockValblk as u32 != 0 && !entry.lksb.0.is_null();
            // SAFETY: the status block the program gave for this lock.
            let lvb = writes.then(|| read_lvb(unsafe { &*entry.lksb.0 }));
            client_message::Body::Unlock(proto::Unlock { handle, flags, lvb })
        };
        self.sender.send(body)?;
        Ok(waiter)
    }

    /// Cancels a waiting request so that it completes with `EDEADLK`
    /// (`dlm_ls_deadlock_cancel`).
    ///
    /// # Errors
    /// No such lock (`ENOENT`), or the session is gone.
    pub fn deadlock_cancel(&self, lkid: u32) -> Result<(), c_int> {
        let mut table = locked(&self.table);
        let entry = table.locks.get_mut(&lkid).ok_or(if lkid == 0 { libc::EINVAL } else { libc::ENOENT })?;
        if !entry.pending {
            return Ok(());
        }
        entry.cancel_status = Some(libc::EDEADLK);
        self.sender.send(client_message::Body::Cancel(proto::Cancel { handle: u64::from(lkid) }))
    }

    /// Gives lock `lkid` the callbacks its next completions and blocking
    /// notices run (an adopted orphan's).
    pub fn set_callbacks(&self, lkid: u32, completion: Call, blocking: Call) {
        if let Some(entry) = locked(&self.table).locks.get_mut(&lkid) {
            entry.completion = completion;
            entry.blocking = blocking;
        }
    }

    /// Runs the callbacks waiting for `dlm_dispatch`, on the calling thread.
    pub fn dispatch(&self) {
        let mut count = [0u8; 8];
        // SAFETY: reading 8 bytes into `count` from our eventfd (non-blocking).
        let _ = unsafe { libc::read(self.fd(), count.as_mut_ptr().cast(), count.len()) };
        loop {
            let next = match &mut *locked(&self.delivery) {
                Delivery::Queue(queue) => queue.pop_front(),
                Delivery::Thread { .. } => None,
            };
            match next {
                Some(pending) => pending.run(),
                None => return,
            }
        }
    }

    /// Runs callbacks on a thread of the library's own from now on
    /// (`dlm_ls_pthread_init`); those already waiting go to it first.
    ///
    /// # Errors
    /// It already has one (`EEXIST`), or no thread could be made.
    pub fn start_ast_thread(&self) -> Result<(), c_int> {
        let mut delivery = locked(&self.delivery);
        let Delivery::Queue(queue) = &mut *delivery else { return Err(libc::EEXIST) };
        let (sender, receiver) = mpsc::channel::<Pending>();
        for pending in queue.drain(..) {
            let _ = sender.send(pending);
        }
        let thread = std::thread::Builder::new()
            .name("dlm-ast".into())
            .spawn(move || {
                for pending in receiver {
                    pending.run();
                }
            })
            .map_err(|_| libc::EAGAIN)?;
        let id = thread.thread().id();
        *delivery = Delivery::Thread { queue: sender, thread: Some(thread), id };
        Ok(())
    }

    /// Ends the session (persistent locks become orphans, the others are
    /// released) and stops the library's threads; nothing is delivered after.
    pub fn close(&self) {
        locked(&self.table).closing = true;
        self.sender.close();
        if let Some(reader) = locked(&self.reader).take() {
            let _ = reader.join();
        }
        let thread = match &mut *locked(&self.delivery) {
            Delivery::Thread { thread, id, .. } if *id != std::thread::current().id() => thread.take(),
            _ => None,
        };
        // The thread ends once the queue's sender is gone.
        *locked(&self.delivery) = Delivery::Queue(VecDeque::new());
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }

    fn deliver(&self, pending: Pending) {
        match &mut *locked(&self.delivery) {
            Delivery::Thread { queue, .. } => {
                let _ = queue.send(pending);
            }
            Delivery::Queue(queue) => {
                queue.push_back(pending);
                let one = 1u64.to_ne_bytes();
                // SAFETY: writing 8 bytes to our eventfd: it becomes readable.
                let _ = unsafe { libc::write(self.fd(), one.as_ptr().cast(), one.len()) };
            }
        }
    }

    /// A request's outcome: written for its waiter, or delivered.
    fn complete(&self, lkid: u32, status: c_int, alive: bool, lvb: Option<Vec<u8>>, wire_flags: u32) {
        let mut table = locked(&self.table);
        let closing = table.closing;
        let Some(entry) = table.locks.get_mut(&lkid) else { return };
        let status = match (status, entry.cancel_status.take()) {
            (abi::ECANCEL, Some(instead)) => instead,
            (status, _) => status,
        };
        entry.pending = false;
        entry.held |= status == 0;
        let update = Update {
            lksb: entry.lksb,
            status,
            lkid,
            flags: status_flags(wire_flags),
            lvb: if entry.valblk { lvb } else { None },
        };
        let (call, waiters) = (entry.completion, std::mem::take(&mut entry.waiters));
        if !alive {
            table.locks.remove(&lkid);
        }
        drop(table);
        if waiters.is_empty() {
            if !closing {
                self.deliver(Pending { update: Some(update), call });
            }
            return;
        }
        // The waiting calls are blocked: the status block is theirs to read.
        update.apply();
        for waiter in waiters {
            waiter.finish(status);
        }
    }

    fn blocking(&self, lkid: u32) {
        let call = locked(&self.table).locks.get(&lkid).map(|entry| entry.blocking);
        if let Some(call) = call.filter(|call| call.function.is_some()) {
            self.deliver(Pending { update: None, call });
        }
    }

    fn receive(&self, body: Body) {
        let lkid = |handle: u64| u32::try_from(handle).unwrap_or(0);
        match body {
            Body::Completion(done) => {
                let status = translate::status(done.status());
                self.complete(lkid(done.handle), status, done.mode.is_some(), done.lvb, done.status_flags);
            }
            Body::Blocking(blocking) => self.blocking(lkid(blocking.handle)),
            Body::Revoked(revoked) => self.complete(lkid(revoked.handle), LOST, false, None, 0),
            Body::Rejected(refused) => {
                // Refused before it changed anything: a new lock is gone, a
                // held one stays.
                let lkid = lkid(refused.handle);
                let held = locked(&self.table).locks.get(&lkid).is_some_and(|entry| entry.held);
                self.complete(lkid, translate::refusal(&refused.code), held, None, 0);
            }
            Body::Welcome(_) => {}
        }
    }

    /// The session is over: every lock is lost, and told so (unless the
    /// program closed the lockspace itself).
    fn session_ended(&self) {
        let lkids: Vec<u32> = {
            let mut table = locked(&self.table);
            table.over = true;
            table.locks.keys().copied().collect()
        };
        for lkid in lkids {
            self.complete(lkid, LOST, false, None, 0);
        }
    }
}

impl Table {
    /// A lock id not in use (never 0).
    fn new_lkid(&mut self) -> u32 {
        loop {
            let lkid = self.next_lkid;
            self.next_lkid = self.next_lkid.checked_add(1).unwrap_or(1);
            if lkid != 0 && !self.locks.contains_key(&lkid) {
                return lkid;
            }
        }
    }
}

/// The reader thread: the agent's messages until the session ends.
fn read(lockspace: &std::sync::Weak<Lockspace>, mut receiver: Receiver) {
    loop {
        let Some(strong) = lockspace.upgrade() else { return };
        let Some(body) = receiver.next_answering(&strong.sender) else {
            strong.session_ended();
            return;
        };
        strong.receive(body);
    }
}

/// The program's value block, as the wire carries it.
fn read_lvb(lksb: &DlmLksb) -> Vec<u8> {
    if lksb.sb_lvbptr.is_null() {
        return Vec::new();
    }
    // SAFETY: a value block the program gave with LKF_VALBLK: DLM_LVB_LEN bytes.
    unsafe { std::slice::from_raw_parts(lksb.sb_lvbptr.cast::<u8>(), DLM_LVB_LEN) }.to_vec()
}

/// `sb_flags` for the wire's status flags.
fn status_flags(wire: u32) -> u8 {
    let mut flags = 0;
    if wire & proto::StatusFlag::Demoted as u32 != 0 {
        flags |= abi::DLM_SBF_DEMOTED;
    }
    if wire & proto::StatusFlag::Altmode as u32 != 0 {
        flags |= abi::DLM_SBF_ALTMODE;
    }
    if wire & proto::StatusFlag::Valnotvalid as u32 != 0 {
        flags |= abi::DLM_SBF_VALNOTVALID;
    }
    flags
}
