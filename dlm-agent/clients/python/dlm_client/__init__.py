"""A Python client for the dlm agent.

    import dlm_client

    with dlm_client.connect("unix:/run/dlm/dlm.sock") as client, client.session() as session:
        with session.lock("orders/42", mode="ex", timeout=5.0) as lock:
            print("held under fencing token", lock.token)

A session is one `Session` stream to the agent: every lock it holds ends
with it. Locks are context managers (leaving the block unlocks); a lock
carries its fencing token and, when asked for (`value_block=True`), the
value block. `try_lock` returns None instead of waiting. A blocking
callback (another client waits for a lock this one holds) calls
`on_blocking(lock, mode)` on a thread of its own, so the handler may
unlock or convert. Failures raise `DlmError` subclasses that name what
happened.

A holder is told at once, on the session's reader thread, when its lock is
lost without its unlock: the agent revoked it, or the session ended (the
agent exited or was killed; someone else may hold the lock now).
`lock.lost` then says why, `lock.wait_lost(timeout)` returns, the
`on_lost(lock, reason)` callback runs, and a `with` block around the lock
raises `LockLost` on exit: work done in it may not have been protected.
"""

import itertools
import queue
import threading

import grpc

from . import dlm_pb2 as pb

__all__ = [
    "connect", "Client", "Session", "Lock", "DlmError", "WouldBlock", "TimedOut", "Deadlock", "Cancelled",
    "Rejected", "Revoked", "Failed", "SessionClosed", "LockLost",
]

_MODES = {"nl": pb.MODE_NL, "cr": pb.MODE_CR, "cw": pb.MODE_CW, "pr": pb.MODE_PR, "pw": pb.MODE_PW, "ex": pb.MODE_EX}
_MODE_NAMES = {v: k for k, v in _MODES.items()}
_SERVICE = "/dlm.v1.Dlm/"


class DlmError(Exception):
    """A request that did not do what was asked."""


class WouldBlock(DlmError):
    """A try-lock (or NOQUEUE request) that could not be granted at once."""


class TimedOut(DlmError):
    """The request's timeout passed before it could be granted."""


class Deadlock(DlmError):
    """The request was chosen as a deadlock victim."""


class Cancelled(DlmError):
    """The request was cancelled."""


class Failed(DlmError):
    """Another status the agent gave (not found, unavailable, fenced, ...)."""

    def __init__(self, status):
        super().__init__(pb.Status.Name(status).removeprefix("STATUS_").lower())
        self.status = status


class Rejected(DlmError):
    """The agent refused the request as invalid; it changed nothing."""

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code


class Revoked(DlmError):
    """The agent took a lock back (its lockspace released, its node fenced or shutting down)."""


class SessionClosed(DlmError):
    """The session's stream ended."""


class LockLost(DlmError):
    """A lock was lost while its `with` block ran: revoked, or its session ended."""


_FAILURES = {
    pb.STATUS_WOULD_BLOCK: WouldBlock,
    pb.STATUS_TIMED_OUT: TimedOut,
    pb.STATUS_DEADLOCK: Deadlock,
    pb.STATUS_CANCELLED: Cancelled,
}


def _mode(mode):
    try:
        return _MODES[mode.lower()] if isinstance(mode, str) else int(mode)
    except KeyError:
        raise ValueError(f"unknown mode {mode!r}: one of {', '.join(_MODES)}") from None


def connect(target, **options):
    """A client of the agent at `target` (`unix:PATH` or `HOST:PORT`).

    Over TCP the agent speaks TLS: pass `ca` (the PEM bytes of the CA that
    signed its certificate), and `cert` and `key` (this client's, its
    identity for the agent's access policy) if it has them; `server_name`
    is the name the agent's certificate must be valid for, when it is not
    the host of `target`."""
    return Client(target, **options)


class Client:
    """A channel to the agent, for sessions and the admin calls."""

    def __init__(self, target, options=None, ca=None, cert=None, key=None, server_name=None):
        options = list(options or [])
        if ca is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            self._channel = grpc.secure_channel(target, credentials, options=options)
        unary = {
            "Status": (pb.StatusRequest, pb.StatusReply),
            "Lockspaces": (pb.LockspacesRequest, pb.LockspacesReply),
            "CreateLockspace": (pb.CreateLockspaceRequest, pb.CreateLockspaceReply),
            "ReleaseLockspace": (pb.ReleaseLockspaceRequest, pb.ReleaseLockspaceReply),
            "Dump": (pb.DumpRequest, pb.DumpReply),
        }
        self._calls = {
            name: self._channel.unary_unary(_SERVICE + name, request_serializer=req.SerializeToString,
                                            response_deserializer=rep.FromString)
            for name, (req, rep) in unary.items()
        }
        self._stream = self._channel.stream_stream(_SERVICE + "Session",
                                                   request_serializer=pb.ClientMessage.SerializeToString,
                                                   response_deserializer=pb.ServerMessage.FromString)

    def session(self, timeout=10.0):
        """A new session (waits up to `timeout` seconds for the agent's welcome)."""
        return Session(self._stream, timeout)

    def status(self, timeout=10.0):
        return self._calls["Status"](pb.StatusRequest(), timeout=timeout)

    def lockspaces(self, timeout=10.0):
        return list(self._calls["Lockspaces"](pb.LockspacesRequest(), timeout=timeout).lockspaces)

    def create_lockspace(self, name, lvb_len=0, timeout=10.0):
        self._calls["CreateLockspace"](pb.CreateLockspaceRequest(name=name, lvb_len=lvb_len), timeout=timeout)

    def release_lockspace(self, name, force=False, timeout=10.0):
        self._calls["ReleaseLockspace"](pb.ReleaseLockspaceRequest(name=name, force=force), timeout=timeout)

    def dump(self, lockspace, name=None, timeout=10.0):
        """Every resource of a lockspace (or the one named), page after page."""
        resources, token = [], b""
        while True:
            request = pb.DumpRequest(lockspace=lockspace, page_token=token)
            if name is not None:
                request.name = name.encode() if isinstance(name, str) else name
            reply = self._calls["Dump"](request, timeout=timeout)
            resources.extend(reply.resources)
            token = reply.next_page_token
            if not token:
                return resources

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()


class _Held:
    """What a lock of either API knows: its name, mode, fencing token and
    value block, and whether (and why) it was lost."""

    def __init__(self, session, handle, name, on_blocking, on_lost):
        self._session = session
        self.handle = handle
        self.name = name
        self.mode = None
        self.token = 0
        self.value = None
        self.value_valid = True
        self.write_value = None
        self.on_blocking = on_blocking
        self.on_lost = on_lost
        self.held = False
        # Why the lock was lost without an unlock (None while it was not).
        self.lost = None

    def _granted(self, completion):
        self.mode = _MODE_NAMES[completion.mode]
        self.token = completion.fencing_token
        if completion.HasField("lvb"):
            self.value = completion.lvb
        self.value_valid = not completion.status_flags & pb.VALNOTVALID
        self.held = True

    def _lose(self, reason):
        """Marks the lock lost; True if it was held."""
        if not self.held:
            return False
        self.held = False
        self.lost = reason
        self._lost.set()
        return True

    def _leaving(self, kind):
        """On leaving a `with` block: raises LockLost if the lock was lost
        in it; True if there is an unlock to do."""
        if self.lost is not None:
            if kind is None or not issubclass(kind, LockLost):
                raise LockLost(f"{self.name!r} was lost while held: {self.lost}")
            return False
        return True

    def __repr__(self):
        return f"Lock({self.name!r}, mode={self.mode}, token={self.token})"


def _outcome(result):
    """A request's completion if it succeeded; else raises what it means."""
    if isinstance(result, Exception):
        raise result
    if result.status in (pb.STATUS_GRANTED, pb.STATUS_UNLOCKED):
        return result
    failure = _FAILURES.get(result.status)
    raise failure(pb.Status.Name(result.status)) if failure else Failed(result.status)


class Lock(_Held):
    """A lock held by a session: its mode, fencing token and value block.
    Leaving a `with` block unlocks it (writing `write_value` if set)."""

    def __init__(self, session, handle, name, on_blocking, on_lost):
        super().__init__(session, handle, name, on_blocking, on_lost)
        self._lost = threading.Event()

    def convert(self, mode, timeout=None, nowait=False):
        """Converts to `mode`, waiting for the grant (or raising)."""
        flags = pb.NOQUEUE if nowait else 0
        message = pb.ClientMessage(convert=pb.Convert(handle=self.handle, mode=_mode(mode), flags=flags,
                                                      timeout_ms=_ms(timeout)))
        completion = self._session._request(self.handle, message)
        self._granted(completion)
        return self

    def wait_lost(self, timeout=None):
        """Waits until the lock is lost (or `timeout` seconds); returns why, or None."""
        self._lost.wait(timeout)
        return self.lost

    def unlock(self, value=None):
        """Unlocks; `value` (bytes) is written to the value block from PW or EX."""
        if not self.held:
            return
        unlock = pb.Unlock(handle=self.handle)
        if value is not None:
            unlock.flags, unlock.lvb = pb.UNLOCK_VALBLK, bytes(value)
        message = pb.ClientMessage(unlock=unlock)
        self.held = False
        self._session._request(self.handle, message)

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        if self._leaving(kind):
            self.unlock(self.write_value)


class Session:
    """One session with the agent. Its requests are answered in the order
    the agent completes them; a reader thread routes each answer to the
    request waiting for it."""

    def __init__(self, stream_call, timeout):
        self._requests = queue.Queue()
        self._waiting = {}
        self._locks = {}
        self._mutex = threading.Lock()
        self._handles = itertools.count(1)
        self._callbacks = queue.Queue()
        self._closed = None
        self._welcome = threading.Event()
        self._stream = stream_call(iter(self._requests.get, None))
        threading.Thread(target=self._read, daemon=True, name="dlm-session").start()
        threading.Thread(target=self._run_callbacks, daemon=True, name="dlm-callbacks").start()
        if not self._welcome.wait(timeout):
            self.close()
            raise SessionClosed("the agent did not welcome the session")

    def lock(self, name, mode="ex", lockspace="default", timeout=None, value_block=False, on_blocking=None,
             flags=0, on_lost=None):
        """Waits for a lock on `name` in `mode` ("nl", "cr", "cw", "pr", "pw", "ex"); raises on failure.
        `timeout` (seconds) bounds the wait; `value_block` reads the value block with the grant;
        `on_lost(lock, reason)` runs when the lock is lost without an unlock."""
        return self._lock(name, mode, lockspace, timeout, value_block, on_blocking, flags, on_lost)

    def try_lock(self, name, mode="ex", lockspace="default", value_block=False, on_blocking=None, on_lost=None):
        """The lock if it can be granted at once, else None."""
        try:
            return self._lock(name, mode, lockspace, None, value_block, on_blocking, pb.NOQUEUE, on_lost)
        except WouldBlock:
            return None

    def _lock(self, name, mode, lockspace, timeout, value_block, on_blocking, flags, on_lost):
        raw = name.encode() if isinstance(name, str) else bytes(name)
        handle = next(self._handles)
        lock = Lock(self, handle, raw, on_blocking, on_lost)
        if value_block:
            flags |= pb.VALBLK
        with self._mutex:
            self._locks[handle] = lock
        message = pb.ClientMessage(lock=pb.Lock(handle=handle, lockspace=lockspace, name=raw, mode=_mode(mode),
                                                flags=flags, timeout_ms=_ms(timeout)))
        try:
            completion = self._request(handle, message)
        except DlmError:
            with self._mutex:
                self._locks.pop(handle, None)
            raise
        lock._granted(completion)
        return lock

    def _request(self, handle, message):
        answer = queue.Queue(maxsize=1)
        with self._mutex:
            if self._closed:
                raise SessionClosed(self._closed)
            self._waiting[handle] = answer
        self._requests.put(message)
        result = _outcome(answer.get())
        if result.status == pb.STATUS_UNLOCKED:
            with self._mutex:
                self._locks.pop(handle, None)
        return result

    def _answer(self, handle, result):
        with self._mutex:
            waiting = self._waiting.pop(handle, None)
        if waiting is not None:
            waiting.put(result)

    def _read(self):
        try:
            for message in self._stream:
                kind = message.WhichOneof("body")
                if kind == "welcome":
                    self.id = message.welcome.session
                    self._welcome.set()
                elif kind == "completion":
                    self._answer(message.completion.handle, message.completion)
                elif kind == "rejected":
                    self._answer(message.rejected.handle, Rejected(message.rejected.code, message.rejected.message))
                elif kind == "blocking":
                    with self._mutex:
                        lock = self._locks.get(message.blocking.handle)
                    if lock is not None and lock.on_blocking is not None:
                        self._callbacks.put((lock.on_blocking, lock, _MODE_NAMES[message.blocking.mode]))
                elif kind == "revoked":
                    with self._mutex:
                        lock = self._locks.pop(message.revoked.handle, None)
                    if lock is not None:
                        self._lost(lock, f"revoked by the agent ({message.revoked.reason})")
            reason = "the agent ended the session"
        except grpc.RpcError as error:
            reason = f"the session broke: {error.code().name} {error.details()}"
        self._end(reason)

    def _lost(self, lock, reason):
        if lock._lose(reason) and lock.on_lost is not None:
            self._callbacks.put((lock.on_lost, lock, reason))

    def _run_callbacks(self):
        for callback, lock, argument in iter(self._callbacks.get, None):
            callback(lock, argument)

    def _end(self, reason):
        with self._mutex:
            self._closed = self._closed or reason
            waiting, self._waiting = self._waiting, {}
            held, self._locks = list(self._locks.values()), {}
        for answer in waiting.values():
            answer.put(SessionClosed(reason))
        for lock in held:
            self._lost(lock, f"the session ended ({reason})")
        self._callbacks.put(None)
        self._welcome.set()

    def close(self):
        """Ends the session: every lock it holds is released by the agent."""
        self._requests.put(None)
        self._stream.cancel()
        self._end("closed")

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()


def _ms(seconds):
    return 0 if seconds is None else max(1, int(seconds * 1000))
