"""The repository's Python client (dlm-agent/clients/python, installed with
pip by the test) against the agent. Usage: python_package.py TARGET; over
TCP, TLS with the files named by DLM_TLS_CA, DLM_TLS_CERT, DLM_TLS_KEY and
the name DLM_TLS_NAME."""

import os
import sys
import threading

import dlm_client

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


with dlm_client.connect(TARGET, **tls_options()) as client:
    client.create_lockspace("pkg", lvb_len=16)
    check(any(ls.name == "pkg" for ls in client.lockspaces()), "the lockspace is listed")
    a, b = client.session(), client.session()

    # An NL lock keeps the resource (and so its value block) between holders.
    keeper = b.lock("r", "nl", lockspace="pkg")
    # A lock as a context manager, its token, and the value block it writes.
    with a.lock("r", "ex", lockspace="pkg", value_block=True) as held:
        check(held.token > 0 and held.mode == "ex", f"EX held: {held}")
        check(b.try_lock("r", "pr", lockspace="pkg") is None, "a try-lock gives None while EX is held")
        held.write_value = b"first"
    first_token = held.token
    check(not held.held, "leaving the block unlocked")

    # A blocking callback: the holder lets go (writing the value block) when asked.
    asked = threading.Event()

    def let_go(lock, mode):
        asked.set()
        lock.unlock(b"second")

    holder = a.lock("r", "pw", lockspace="pkg", value_block=True, on_blocking=let_go)
    check(holder.value.startswith(b"first"), f"the value written before: {holder.value}")
    reader = b.lock("r", "pr", lockspace="pkg", value_block=True, timeout=5.0)
    check(asked.is_set() and reader.value.startswith(b"second"), f"the callback ran and wrote: {reader.value}")
    check(reader.token > first_token, "tokens increase")

    # Conversion, timeout, typed rejection.
    reader.convert("ex")
    check(reader.mode == "ex", "converted to EX")
    try:
        a.lock("r", "ex", lockspace="pkg", timeout=0.05)
        check(False, "a request behind EX times out")
    except dlm_client.TimedOut:
        check(True, "TimedOut")
    try:
        a.lock("r", lockspace="no-such-lockspace")
        check(False, "an unknown lockspace is refused")
    except dlm_client.Rejected as error:
        check(error.code == "unknown_lockspace", f"a typed rejection: {error}")
    reader.unlock()

    # A deadlock between the two sessions: one of the two requests fails.
    x, y = a.lock("x", lockspace="pkg"), b.lock("y", lockspace="pkg")
    outcomes = []

    def ask(session, name):
        try:
            outcomes.append(session.lock(name, lockspace="pkg", timeout=10.0))
        except dlm_client.Deadlock as error:
            outcomes.append(error)
            (x if session is a else y).unlock()

    threads = [threading.Thread(target=ask, args=(a, "y")), threading.Thread(target=ask, args=(b, "x"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    victims = [o for o in outcomes if isinstance(o, dlm_client.Deadlock)]
    check(len(outcomes) == 2 and len(victims) == 1, f"one deadlock victim, the other granted: {outcomes}")

    # A lock lost without its unlock: the holder is told at once (wait_lost,
    # on_lost) and a `with` block around it raises LockLost on exit.
    client.create_lockspace("doomed")
    told, told_once = [], threading.Event()

    def on_lost(lock, reason):
        told.append(reason)
        told_once.set()

    doomed = a.lock("d", lockspace="doomed", on_lost=on_lost)
    try:
        with doomed:
            client.release_lockspace("doomed", force=True)
            reason = doomed.wait_lost(5.0)
            check(reason is not None and reason.startswith("revoked"), f"told of the revocation: {reason}")
            check(not doomed.held, "a lost lock is not held")
        check(False, "leaving the block of a lost lock raises")
    except dlm_client.LockLost as error:
        check("revoked" in str(error), f"LockLost says why: {error}")
    check(told_once.wait(5.0) and len(told) == 1 and told[0].startswith("revoked"), f"on_lost ran once: {told}")
    ending = client.session()
    kept = ending.lock("k", lockspace="pkg")
    ending.close()
    check(kept.wait_lost(5.0) is not None and "session ended" in kept.lost, f"the session's end loses it: {kept.lost}")

    dump = client.dump("pkg")
    check({r.name for r in dump} >= {b"x", b"y"}, f"the dump shows the resources: {[r.name for r in dump]}")
    a.close()
    b.close()
    client.release_lockspace("pkg", force=True)
print(f"{checks} passed, 0 failed")
