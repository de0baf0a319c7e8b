"""The repository's Python client's asyncio API (dlm_client.aio, the
package installed with pip by the test) against the agent: async with,
a lock not acquired raises and its block never runs, blocking callbacks as
coroutines, conversions, value blocks, and a lost lock delivered (callback,
wait_lost, LockLost at the end of the block). Usage: python_asyncio.py
TARGET; over TCP, TLS with the files named by DLM_TLS_CA, DLM_TLS_CERT,
DLM_TLS_KEY and the name DLM_TLS_NAME."""

import asyncio
import os
import sys

import dlm_client
from dlm_client import aio

TARGET = sys.argv[1]
checks = 0


def check(condition, what):
    global checks
    if not condition:
        sys.exit(f"FAILED: {what}")
    checks += 1


def tls_options():
    if TARGET.startswith("unix:") or "DLM_TLS_CA" not in os.environ:
        return {}
    read = lambda var: open(os.environ[var], "rb").read()
    return {"ca": read("DLM_TLS_CA"), "cert": read("DLM_TLS_CERT"), "key": read("DLM_TLS_KEY"),
            "server_name": os.environ["DLM_TLS_NAME"]}


async def main():
    async with aio.connect(TARGET, **tls_options()) as client:
        await client.create_lockspace("aio", lvb_len=16)
        check(any(ls.name == "aio" for ls in await client.lockspaces()), "the lockspace is listed")
        a, b = await client.session(), await client.session()

        # An NL lock keeps the resource (and so its value block) between holders.
        keeper = await b.lock("r", "nl", lockspace="aio")
        # async with: held in the block, unlocked after it.
        async with a.lock("r", "ex", lockspace="aio", value_block=True) as held:
            check(held.held and held.token > 0 and held.mode == "ex", f"EX held: {held}")
            check(await b.try_lock("r", "pr", lockspace="aio") is None, "a try-lock gives None while EX is held")
            entered = False
            try:
                async with b.lock("r", "pr", lockspace="aio", timeout=0.1):
                    entered = True
            except dlm_client.TimedOut:
                check(not entered, "a lock not acquired raises TimedOut, and its block never runs")
            held.write_value = b"first"
        check(not held.held, "leaving the block unlocked")

        # A blocking callback as a coroutine: the holder lets go when asked.
        asked = asyncio.Event()

        async def let_go(lock, mode):
            asked.set()
            await lock.unlock(b"second")

        holder = await a.lock("r", "pw", lockspace="aio", value_block=True, on_blocking=let_go)
        check(holder.value.startswith(b"first"), f"the value written before: {holder.value}")
        reader = await b.lock("r", "pr", lockspace="aio", value_block=True, timeout=5.0)
        check(asked.is_set() and reader.value.startswith(b"second"), f"the callback ran and wrote: {reader.value}")
        check(reader.token > held.token, "tokens increase")
        await reader.convert("ex")
        check(reader.mode == "ex", "converted to EX")
        try:
            await a.lock("r", lockspace="no-such-lockspace")
            check(False, "an unknown lockspace is refused")
        except dlm_client.Rejected as error:
            check(error.code == "unknown_lockspace", f"a typed rejection: {error}")
        await reader.unlock()
        await keeper.unlock()

        # Many tasks contending on one resource: never two EX holders.
        inside, most = 0, 0

        async def worker(session, n):
            nonlocal inside, most
            for _ in range(n):
                async with session.lock("hot", "ex", lockspace="aio", timeout=10.0):
                    inside += 1
                    most = max(most, inside)
                    await asyncio.sleep(0)
                    inside -= 1

        sessions = [await client.session() for _ in range(4)]
        await asyncio.gather(*(worker(s, 25) for s in sessions))
        check(most == 1, f"at most one EX holder at a time, saw {most}")
        for session in sessions:
            await session.close()

        # A lost lock: the lockspace released with force under the holder.
        told = []
        lost_here = False
        try:
            async with a.lock("gone", "ex", lockspace="aio", on_lost=lambda lock, why: told.append(why)) as doomed:
                await client.release_lockspace("aio", force=True)
                reason = await doomed.wait_lost(5.0)
                check(reason is not None and "revoked" in reason, f"wait_lost says why: {reason}")
        except dlm_client.LockLost as error:
            lost_here = True
            check("revoked" in str(error), f"LockLost says why: {error}")
        check(lost_here, "leaving the block of a lost lock raises LockLost")
        await asyncio.sleep(0)
        check(told and "revoked" in told[0], f"on_lost was called: {told}")

        # A session that ends (closed here) tells its holders.
        c = await client.session()
        kept = await c.lock("k", "ex")
        await c.close()
        check(kept.lost is not None and not kept.held, f"a closed session's lock is lost: {kept.lost}")
        await a.close()
        await b.close()
    print(f"{checks} passed, 0 failed")


asyncio.run(main())
