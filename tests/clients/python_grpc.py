"""A dlm session from Python's grpcio, unmodified: stubs generated from the
repository's .proto at test time, the channel opened with grpcio's defaults
on the agent's Unix socket (grpcio then sends the socket path,
percent-encoded, as the request authority) or on its TCP listener.
Usage: python_grpc.py TARGET PROTO_DIR, TARGET being unix:PATH or HOST:PORT"""

import atexit
import os
import queue
import shutil
import sys
import tempfile
import threading
import time

import grpc
from grpc_tools import protoc

TARGET, PROTO_DIR = sys.argv[1], sys.argv[2]
OUT = tempfile.mkdtemp(prefix="dlm-py-")
atexit.register(shutil.rmtree, OUT, ignore_errors=True)  # generated stubs: not left in /tmp
if protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={OUT}", f"--grpc_python_out={OUT}",
                os.path.join(PROTO_DIR, "dlm/v1/dlm.proto")]) != 0:
    sys.exit("protoc failed")
sys.path.insert(0, OUT)
from dlm.v1 import dlm_pb2 as pb  # noqa: E402
from dlm.v1 import dlm_pb2_grpc as rpc  # noqa: E402

WAIT = 10.0
checks = 0


def check(condition, what):
    global checks
    if not condition:
        sys.exit(f"FAILED: {what}")
    checks += 1


class Session:
    """One Session stream: requests go in through a queue, answers come
    out through another (read by a thread)."""

    def __init__(self, stub):
        self.requests = queue.Queue()
        self.answers = queue.Queue()
        stream = stub.Session(iter(self.requests.get, None))
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()
        welcome = self.next()
        check(welcome.WhichOneof("body") == "welcome", f"a welcome first, got {welcome}")
        self.id = welcome.welcome.session

    def _read(self, stream):
        try:
            for message in stream:
                self.answers.put(message)
        except grpc.RpcError as error:
            self.answers.put(error)

    def next(self):
        message = self.answers.get(timeout=WAIT)
        if isinstance(message, grpc.RpcError):
            sys.exit(f"FAILED: the session broke: {message.code()} {message.details()}")
        return message

    def send(self, **body):
        self.requests.put(pb.ClientMessage(**body))

    def lock(self, handle, name, mode, flags=0, timeout_ms=0, lockspace="py"):
        self.send(lock=pb.Lock(handle=handle, lockspace=lockspace, name=name, mode=mode, flags=flags,
                               timeout_ms=timeout_ms))

    def completion(self, handle):
        message = self.next()
        check(message.WhichOneof("body") == "completion" and message.completion.handle == handle,
              f"a completion of {handle}, got {message}")
        return message.completion

    def close(self):
        self.requests.put(None)


if TARGET.startswith("unix:") or "DLM_TLS_CA" not in os.environ:
    channel = grpc.insecure_channel(TARGET)
else:
    # TCP: TLS against the cluster's CA, with a client certificate (the
    # client's identity for the agent's access policy).
    read = lambda var: open(os.environ[var], "rb").read()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read("DLM_TLS_CA"), private_key=read("DLM_TLS_KEY"),
        certificate_chain=read("DLM_TLS_CERT"))
    channel = grpc.secure_channel(TARGET, credentials,
                                  options=[("grpc.ssl_target_name_override", os.environ["DLM_TLS_NAME"])])
stub = rpc.DlmStub(channel)

# Admin calls.
status = stub.Status(pb.StatusRequest(), timeout=WAIT)
check(status.version != "", "Status answers")
stub.CreateLockspace(pb.CreateLockspaceRequest(name="py", lvb_len=16), timeout=WAIT)
names = [ls.name for ls in stub.Lockspaces(pb.LockspacesRequest(), timeout=WAIT).lockspaces]
check("py" in names, f"the new lockspace is listed: {names}")

a, b = Session(stub), Session(stub)

# Lock, try-lock, blocking callback, value block, fencing tokens.
a.lock(1, b"r", pb.MODE_EX, pb.VALBLK)
first = a.completion(1)
check(first.status == pb.STATUS_GRANTED and first.fencing_token > 0, f"EX granted: {first}")
b.lock(1, b"r", pb.MODE_EX, pb.NOQUEUE)
check(b.completion(1).status == pb.STATUS_WOULD_BLOCK, "a try-lock would block")
b.lock(2, b"r", pb.MODE_PR, pb.VALBLK)
blocking = a.next()
check(blocking.WhichOneof("body") == "blocking" and blocking.blocking.mode == pb.MODE_PR,
      f"the holder hears it blocks PR: {blocking}")
a.send(unlock=pb.Unlock(handle=1, flags=pb.UNLOCK_VALBLK, lvb=b"hello"))
check(a.completion(1).status == pb.STATUS_UNLOCKED, "unlocked")
read = b.completion(2)
check(read.status == pb.STATUS_GRANTED and read.lvb.startswith(b"hello"), f"PR reads the value block: {read}")
check(read.fencing_token > first.fencing_token, "tokens increase")

# Conversion, timeout, cancel.
b.send(convert=pb.Convert(handle=2, mode=pb.MODE_EX))
converted = b.completion(2)
check(converted.status == pb.STATUS_GRANTED and converted.mode == pb.MODE_EX, f"converted to EX: {converted}")
a.lock(2, b"r", pb.MODE_EX, timeout_ms=50)
check(a.completion(2).status == pb.STATUS_TIMED_OUT, "a request times out")
check(b.next().WhichOneof("body") == "blocking", "the holder heard of the request that timed out")
a.lock(3, b"r", pb.MODE_EX)  # no second callback: one per blocking episode
a.send(cancel=pb.Cancel(handle=3))
check(a.completion(3).status == pb.STATUS_CANCELLED, "a waiting request is cancelled")
b.send(unlock=pb.Unlock(handle=2))
check(b.completion(2).status == pb.STATUS_UNLOCKED, "unlocked")

# A deadlock: each session holds one resource and asks for the other's.
a.lock(10, b"x", pb.MODE_EX)
b.lock(10, b"y", pb.MODE_EX)
check(a.completion(10).status == pb.STATUS_GRANTED and b.completion(10).status == pb.STATUS_GRANTED, "both hold")
a.lock(11, b"y", pb.MODE_EX)
b.lock(11, b"x", pb.MODE_EX)
seen = []
deadline = time.monotonic() + WAIT
while time.monotonic() < deadline and not any(
        m.WhichOneof("body") == "completion" and m.completion.status == pb.STATUS_DEADLOCK for m in seen):
    for session in (a, b):
        try:
            seen.append(session.answers.get(timeout=0.05))
        except queue.Empty:
            pass
victims = [m for m in seen if m.WhichOneof("body") == "completion" and m.completion.status == pb.STATUS_DEADLOCK]
check(len(victims) == 1 and victims[0].completion.handle == 11, f"one request is a deadlock victim: {seen}")

# A typed rejection changes nothing.
a.lock(20, b"r", pb.MODE_EX, lockspace="no-such-lockspace")
rejected = a.next()
check(rejected.WhichOneof("body") == "rejected" and rejected.rejected.code == "unknown_lockspace",
      f"a typed rejection: {rejected}")

# The dump sees the locks; a forced release ends them.
dump = stub.Dump(pb.DumpRequest(lockspace="py"), timeout=WAIT)
check(any(r.name in (b"x", b"y") for r in dump.resources), f"the dump shows the resources: {dump}")
a.close()
b.close()
stub.ReleaseLockspace(pb.ReleaseLockspaceRequest(name="py", force=True), timeout=WAIT)
try:
    stub.Dump(pb.DumpRequest(lockspace="py"), timeout=WAIT)
    check(False, "a released lockspace is gone")
except grpc.RpcError as error:
    check(error.code() == grpc.StatusCode.NOT_FOUND, f"NOT_FOUND after release: {error.code()}")
print(f"{checks} passed, 0 failed")
