"""The dlm client for asyncio: the same sessions and locks as `dlm_client`,
awaited instead of waited for.

    import asyncio
    from dlm_client import aio

    async def main():
        async with aio.connect("unix:/run/dlm/dlm.sock") as client:
            async with await client.session() as session:
                async with session.lock("orders/42", mode="ex", timeout=5.0) as lock:
                    print("held under fencing token", lock.token)

    asyncio.run(main())

`session.lock(...)` is both awaitable (`lock = await session.lock(...)`)
and an async context manager (the block runs only once the lock is held;
leaving it unlocks). A lock that is not granted raises (`TimedOut`,
`WouldBlock`, `Deadlock`, `Rejected`, ...): the block never runs
unprotected. `try_lock` returns None instead of waiting.

A holder is told at once when its lock is lost without its unlock (the
agent revoked it, or the session ended: the agent exited or was killed):
`lock.lost` says why, `await lock.wait_lost()` returns, `on_lost(lock,
reason)` is called (awaited, if it is a coroutine function), and an
`async with` block around the lock raises `LockLost` on exit. A blocking
callback, `on_blocking(lock, mode)`, runs (or is awaited) as a task of its
own when another client waits for the lock, so it may unlock or convert.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
from typing import Any, Awaitable, Callable, Optional, Union

import grpc

from . import _SERVICE, Rejected, SessionClosed, WouldBlock, _Held, _mode, _ms, _outcome, _MODE_NAMES
from . import dlm_pb2 as pb

__all__ = ["connect", "Client", "Session", "Lock"]

Mode = Union[str, int]
OnBlocking = Callable[["Lock", str], Union[None, Awaitable[None]]]
OnLost = Callable[["Lock", str], Union[None, Awaitable[None]]]


def connect(target: str, **options: Any) -> "Client":
    """A client of the agent at `target` (`unix:PATH` or `HOST:PORT`); the
    options are `dlm_client.connect`'s (`ca`, `cert`, `key`, `server_name`)."""
    return Client(target, **options)


class Client:
    """An asyncio channel to the agent, for sessions and the admin calls."""

    def __init__(self, target: str, options: Optional[list] = None, ca: Optional[bytes] = None,
                 cert: Optional[bytes] = None, key: Optional[bytes] = None, server_name: Optional[str] = None):
        options = list(options or [])
        if ca is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)

        def unary(name: str, request: Any, reply: Any) -> Any:
            return self._channel.unary_unary(_SERVICE + name, request_serializer=request.SerializeToString,
                                             response_deserializer=reply.FromString)

        self._status = unary("Status", pb.StatusRequest, pb.StatusReply)
        self._lockspaces = unary("Lockspaces", pb.LockspacesRequest, pb.LockspacesReply)
        self._create = unary("CreateLockspace", pb.CreateLockspaceRequest, pb.CreateLockspaceReply)
        self._release = unary("ReleaseLockspace", pb.ReleaseLockspaceRequest, pb.ReleaseLockspaceReply)
        self._stream = self._channel.stream_stream(_SERVICE + "Session",
                                                   request_serializer=pb.ClientMessage.SerializeToString,
                                                   response_deserializer=pb.ServerMessage.FromString)

    async def session(self, timeout: float = 10.0) -> "Session":
        """A new session, once the agent welcomed it (within `timeout` seconds)."""
        session = Session(self._stream())
        await session._opened(timeout)
        return session

    async def status(self, timeout: float = 10.0) -> Any:
        return await self._status(pb.StatusRequest(), timeout=timeout)

    async def lockspaces(self, timeout: float = 10.0) -> list:
        return list((await self._lockspaces(pb.LockspacesRequest(), timeout=timeout)).lockspaces)

    async def create_lockspace(self, name: str, lvb_len: int = 0, timeout: float = 10.0) -> None:
        await self._create(pb.CreateLockspaceRequest(name=name, lvb_len=lvb_len), timeout=timeout)

    async def release_lockspace(self, name: str, force: bool = False, timeout: float = 10.0) -> None:
        await self._release(pb.ReleaseLockspaceRequest(name=name, force=force), timeout=timeout)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.close()


class Lock(_Held):
    """A lock held by a session: its mode, fencing token and value block.
    Leaving an `async with` block unlocks it (writing `write_value` if set),
    or raises `LockLost` if it was lost meanwhile."""

    def __init__(self, session: "Session", handle: int, name: bytes, on_blocking: Optional[OnBlocking],
                 on_lost: Optional[OnLost]):
        super().__init__(session, handle, name, on_blocking, on_lost)
        self.mode: Optional[str] = None
        self.value: Optional[bytes] = None
        self.write_value: Optional[bytes] = None
        #: Why the lock was lost without an unlock (None while it was not).
        self.lost: Optional[str] = None
        self._lost = asyncio.Event()

    async def convert(self, mode: Mode, timeout: Optional[float] = None, nowait: bool = False) -> "Lock":
        """Converts to `mode`, once granted (or raises)."""
        flags = pb.NOQUEUE if nowait else 0
        message = pb.ClientMessage(convert=pb.Convert(handle=self.handle, mode=_mode(mode), flags=flags,
                                                      timeout_ms=_ms(timeout)))
        self._granted(await self._session._request(self.handle, message))
        return self

    async def unlock(self, value: Optional[bytes] = None) -> None:
        """Unlocks; `value` is written to the value block from PW or EX."""
        if not self.held:
            return
        unlock = pb.Unlock(handle=self.handle)
        if value is not None:
            unlock.flags, unlock.lvb = pb.UNLOCK_VALBLK, bytes(value)
        self.held = False
        await self._session._request(self.handle, pb.ClientMessage(unlock=unlock))

    async def wait_lost(self, timeout: Optional[float] = None) -> Optional[str]:
        """Waits until the lock is lost (or `timeout` seconds); returns why, or None."""
        try:
            await asyncio.wait_for(self._lost.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return self.lost

    async def __aenter__(self) -> "Lock":
        return self

    async def __aexit__(self, kind: Any, *_: Any) -> None:
        if self._leaving(kind):
            await self.unlock(self.write_value)


class _Acquiring:
    """`session.lock(...)`: awaited, the lock; as an async context manager,
    the lock held for the block."""

    def __init__(self, acquire: Awaitable[Lock]):
        self._acquire = acquire
        self._lock: Optional[Lock] = None

    def __await__(self):
        return self._acquire.__await__()

    async def __aenter__(self) -> Lock:
        self._lock = await self._acquire
        return self._lock

    async def __aexit__(self, *exc: Any) -> None:
        assert self._lock is not None
        await self._lock.__aexit__(*exc)


class Session:
    """One session with the agent (one `Session` stream): a task reads its
    answers and hands each to the request awaiting it."""

    def __init__(self, call: Any):
        self._call = call
        self._waiting: dict = {}
        self._locks: dict = {}
        self._handles = itertools.count(1)
        self._closed: Optional[str] = None
        self._welcome: asyncio.Future = asyncio.get_running_loop().create_future()
        self._tasks: set = set()
        self._reader = asyncio.create_task(self._read())
        self.id: Optional[int] = None

    async def _opened(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self._welcome), timeout)
        except asyncio.TimeoutError:
            await self.close()
            raise SessionClosed("the agent did not welcome the session") from None
        if self.id is None:
            # The stream ended before a welcome: the agent refused the session.
            raise SessionClosed(self._closed or "the agent refused the session")

    def lock(self, name: Union[str, bytes], mode: Mode = "ex", lockspace: str = "default",
             timeout: Optional[float] = None, value_block: bool = False, on_blocking: Optional[OnBlocking] = None,
             flags: int = 0, on_lost: Optional[OnLost] = None) -> _Acquiring:
        """A lock on `name` in `mode` ("nl", "cr", "cw", "pr", "pw", "ex"), once granted; raises if it is
        not. `timeout` (seconds) bounds the wait; `value_block` reads the value block with the grant."""
        return _Acquiring(self._lock(name, mode, lockspace, timeout, value_block, on_blocking, flags, on_lost))

    async def try_lock(self, name: Union[str, bytes], mode: Mode = "ex", lockspace: str = "default",
                       value_block: bool = False, on_blocking: Optional[OnBlocking] = None,
                       on_lost: Optional[OnLost] = None) -> Optional[Lock]:
        """The lock if it can be granted at once, else None."""
        try:
            return await self._lock(name, mode, lockspace, None, value_block, on_blocking, pb.NOQUEUE, on_lost)
        except WouldBlock:
            return None

    async def _lock(self, name: Union[str, bytes], mode: Mode, lockspace: str, timeout: Optional[float],
                    value_block: bool, on_blocking: Optional[OnBlocking], flags: int,
                    on_lost: Optional[OnLost]) -> Lock:
        raw = name.encode() if isinstance(name, str) else bytes(name)
        handle = next(self._handles)
        lock = Lock(self, handle, raw, on_blocking, on_lost)
        if value_block:
            flags |= pb.VALBLK
        self._locks[handle] = lock
        message = pb.ClientMessage(lock=pb.Lock(handle=handle, lockspace=lockspace, name=raw, mode=_mode(mode),
                                                flags=flags, timeout_ms=_ms(timeout)))
        try:
            completion = await self._request(handle, message)
        except BaseException:
            self._locks.pop(handle, None)
            raise
        lock._granted(completion)
        return lock

    async def _request(self, handle: int, message: Any) -> Any:
        if self._closed:
            raise SessionClosed(self._closed)
        answer = asyncio.get_running_loop().create_future()
        self._waiting[handle] = answer
        await self._call.write(message)
        result = _outcome(await answer)
        if result.status == pb.STATUS_UNLOCKED:
            self._locks.pop(handle, None)
        return result

    def _answer(self, handle: int, result: Any) -> None:
        answer = self._waiting.pop(handle, None)
        if answer is not None and not answer.done():
            answer.set_result(result)

    def _call_back(self, callback: Callable[..., Any], lock: Lock, argument: str) -> None:
        async def run() -> None:
            outcome = callback(lock, argument)
            if inspect.isawaitable(outcome):
                await outcome

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(self) -> None:
        reason = "the agent ended the session"
        try:
            while True:
                message = await self._call.read()
                if message is grpc.aio.EOF:
                    break
                kind = message.WhichOneof("body")
                if kind == "welcome":
                    self.id = message.welcome.session
                    if not self._welcome.done():
                        self._welcome.set_result(None)
                elif kind == "completion":
                    self._answer(message.completion.handle, message.completion)
                elif kind == "rejected":
                    self._answer(message.rejected.handle, Rejected(message.rejected.code, message.rejected.message))
                elif kind == "blocking":
                    lock = self._locks.get(message.blocking.handle)
                    if lock is not None and lock.on_blocking is not None:
                        self._call_back(lock.on_blocking, lock, _MODE_NAMES[message.blocking.mode])
                elif kind == "revoked":
                    lock = self._locks.pop(message.revoked.handle, None)
                    if lock is not None:
                        self._lost(lock, f"revoked by the agent ({message.revoked.reason})")
        except grpc.aio.AioRpcError as error:
            reason = f"the session broke: {error.code().name} {error.details()}"
        except asyncio.CancelledError:
            reason = "closed"
        self._end(reason)

    def _lost(self, lock: Lock, reason: str) -> None:
        if lock._lose(reason) and lock.on_lost is not None:
            self._call_back(lock.on_lost, lock, reason)

    def _end(self, reason: str) -> None:
        self._closed = self._closed or reason
        waiting, self._waiting = self._waiting, {}
        held, self._locks = list(self._locks.values()), {}
        for answer in waiting.values():
            if not answer.done():
                answer.set_result(SessionClosed(reason))
        for lock in held:
            self._lost(lock, f"the session ended ({reason})")
        if not self._welcome.done():
            self._welcome.set_result(None)

    async def close(self) -> None:
        """Ends the session: every lock it holds is released by the agent."""
        if self._closed is None:
            self._closed = "closed"
            self._call.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def __aenter__(self) -> "Session":
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.close()

