"""The connection and session quotas from Python's grpcio (grpc.aio): 16
channels with connections of their own, of which those past
limits.connections_per_client_max (CONNECTIONS) are refused at once with
RESOURCE_EXHAUSTED naming the limit and how to raise it; then SESSIONS
sessions over 8 channels (grpcio multiplexes them on one connection, so
past HTTP/2's stream limit), every one welcomed, and the next ones refused
just as plainly, naming limits.sessions_per_uid_max.
Usage: python_quota.py TARGET PROTO_DIR SESSIONS CONNECTIONS"""

import asyncio
import atexit
import os
import shutil
import sys
import tempfile

import grpc
from grpc_tools import protoc

TARGET, PROTO_DIR = sys.argv[1], sys.argv[2]
SESSIONS, CONNECTIONS = int(sys.argv[3]), int(sys.argv[4])
OUT = tempfile.mkdtemp(prefix="dlm-py-quota-")
atexit.register(shutil.rmtree, OUT, ignore_errors=True)  # generated stubs: not left in /tmp
if protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={OUT}", f"--grpc_python_out={OUT}",
                os.path.join(PROTO_DIR, "dlm/v1/dlm.proto")]) != 0:
    sys.exit("protoc failed")
sys.path.insert(0, OUT)
from dlm.v1 import dlm_pb2_grpc as rpc  # noqa: E402

ANSWER_WITHIN = 5.0
checks = 0


def check(condition, what):
    global checks
    if not condition:
        sys.exit(f"FAILED: {what}")
    checks += 1


async def open_session(channel):
    """A session's first answer: its welcome, or the error it was refused with."""
    call = rpc.DlmStub(channel).Session()
    try:
        first = await asyncio.wait_for(call.read(), ANSWER_WITHIN)
    except asyncio.TimeoutError:
        sys.exit(f"FAILED: no welcome and no error within {ANSWER_WITHIN} s")
    except grpc.aio.AioRpcError as error:
        return call, error
    check(first.WhichOneof("body") == "welcome", f"a welcome, got {first}")
    return call, None


def refused_for(error, limit):
    check(error is not None, f"refused for {limit}")
    check(error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, f"RESOURCE_EXHAUSTED, got {error.code()}")
    check(f"limits.{limit}" in error.details() and "raise" in error.details(),
          f"the refusal names limits.{limit} and how to raise it: {error.details()}")


async def sessions_up_to_the_limit():
    channels = [grpc.aio.insecure_channel(TARGET) for _ in range(8)]
    # The connections of the first part close as the agent sees them go:
    # the first session waits for room.
    loop = asyncio.get_running_loop()
    until = loop.time() + ANSWER_WITHIN
    while True:
        call, error = await open_session(channels[0])
        if error is None:
            break
        check(loop.time() < until, f"connections given back are not free again: {error.details()}")
        await asyncio.sleep(0.05)
    calls = [call]
    for n in range(1, SESSIONS):
        call, error = await open_session(channels[n % len(channels)])
        check(error is None, f"session {n + 1} of {SESSIONS} refused: {error}")
        calls.append(call)
    for _ in range(3):
        _, error = await open_session(channels[0])
        refused_for(error, "sessions_per_uid_max")
    for call in calls:
        call.cancel()
    for channel in channels:
        await channel.close()


async def connections_up_to_the_limit():
    own = [grpc.aio.insecure_channel(TARGET, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(16)]
    welcomed, refusals = [], []
    for channel in own:
        call, error = await open_session(channel)
        (refusals if error else welcomed).append(error or call)
    check(len(welcomed) == CONNECTIONS, f"{CONNECTIONS} connections served, got {len(welcomed)}")
    for error in refusals:
        refused_for(error, "connections_per_client_max")
    for channel in own:
        await channel.close()


async def main():
    await connections_up_to_the_limit()
    await sessions_up_to_the_limit()
    print(f"{checks} passed, 0 failed")


asyncio.run(main())
