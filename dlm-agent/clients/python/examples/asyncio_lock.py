"""Takes a lock with asyncio, prints its fencing token, and shows what a
second task gets while it is held: `python3 asyncio_lock.py [TARGET] [NAME]`
(`unix:/run/dlm/dlm.sock` and `orders/42` by default). The test command
runs it against a real agent (tests/clients.rs)."""

import asyncio
import sys

from dlm_client import aio
import dlm_client


async def main(target: str, name: str) -> None:
    async with aio.connect(target) as client:
        async with await client.session() as first, await client.session() as second:
            async with first.lock(name, mode="ex", timeout=5.0) as lock:
                # Pass the fencing token to the storage you write to, so that
                # it can refuse a writer that has lost the lock since.
                print("held", name, "under fencing token", lock.token)
                print("a try-lock meanwhile gets", await second.try_lock(name))
                try:
                    async with second.lock(name, timeout=0.1):
                        print("never printed: the block runs only under the lock")
                except dlm_client.TimedOut:
                    print("a lock that is not granted raises TimedOut")
            async with second.lock(name, mode="pr") as shared:
                print("then the second session holds it in", shared.mode, "under token", shared.token)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "unix:/run/dlm/dlm.sock",
                     sys.argv[2] if len(sys.argv) > 2 else "orders/42"))
