"""RPC timeouts: bad values are refused up front, and a server that never answers gives a
TimeoutError and a clean exit, not an abort when the interpreter finalizes.

Every server here is a Python socket on 127.0.0.1 run by a thread with a bounded life."""

from __future__ import annotations

import math
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ibert_tvm import remote

REPO = Path(__file__).resolve().parents[1]
SERVER_LIFE_S = 60.0  # no server thread outlives a hung test by more than this
SUBPROCESS_S = 120.0  # a child imports TVM (seconds), then waits well under 1 s


class Server:
    """Listens on 127.0.0.1 and accepts; sends nothing. `close_after`: drop each connection that
    many seconds after accepting it (None: keep it open); `handle`: serve each connection instead."""

    def __init__(self, close_after: float | None = None,
                 handle: Callable[[socket.socket], None] | None = None) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.settimeout(0.05)  # accept() wakes up to check for the end
        self.address = "127.0.0.1:%d" % self.listener.getsockname()[1]
        self.close_after, self.handle = close_after, handle
        self.accepted: list[tuple[socket.socket, float]] = []
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        end = time.monotonic() + SERVER_LIFE_S
        while not self._stop.is_set() and time.monotonic() < end:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                conn = None
            if conn is not None:
                if self.handle is not None:
                    with conn:
                        conn.settimeout(5.0)
                        self.handle(conn)
                else:
                    self.accepted.append((conn, time.monotonic()))
            if self.close_after is not None:
                for c, at in self.accepted:
                    if time.monotonic() - at >= self.close_after:
                        c.close()

    def read_from_first(self, nbytes: int) -> bytes:
        conn = self.accepted[0][0]
        conn.settimeout(5.0)
        return conn.recv(nbytes)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        for conn, _ in self.accepted:
            conn.close()
        self.listener.close()


@pytest.fixture
def silent() -> Iterator[Server]:
    server = Server()
    yield server
    server.close()


def refused_address() -> tuple[socket.socket, str]:
    """A bound port that does not listen: connections are refused at once (keep the socket open)."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    return holder, "127.0.0.1:%d" % holder.getsockname()[1]


def new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    """Threads started since `before` that are still running: a connect's leftover worker."""
    return [t for t in threading.enumerate() if t not in before]


# -- validation -----------------------------------------------------------------------------------

BAD = [-1, 0, -0.5, math.nan, math.inf, -math.inf, True, False, "10", None, 10**400]


@pytest.mark.parametrize("timeout", BAD, ids=repr)
def test_bad_timeouts_are_refused_before_connecting(timeout: object, silent: Server) -> None:
    before = set(threading.enumerate())
    for call in (lambda: remote.connect(silent.address, timeout),  # type: ignore[arg-type]
                 lambda: remote.check_tracker(silent.address, "arm64", timeout)):  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=re.escape(f"RPC timeout must be a positive number of seconds, got {timeout!r}")):
            call()
    time.sleep(0.2)  # a connection, had one been made, would be accepted by now
    assert silent.accepted == [] and new_threads(before) == []


def test_the_message_names_the_value_as_given() -> None:
    with pytest.raises(ValueError, match=r"^RPC timeout must be a positive number of seconds, got -1$"):
        remote.check_timeout(-1)


@pytest.mark.parametrize("timeout", [0.001, 0.5, 1, 10, 1e6])
def test_good_timeouts_pass_as_floats(timeout: float) -> None:
    assert remote.check_timeout(timeout) == float(timeout)
    assert type(remote.check_timeout(timeout)) is float


def test_numpy_scalars_are_numbers() -> None:
    np = pytest.importorskip("numpy")
    assert remote.check_timeout(np.float32(0.5)) == 0.5
    assert remote.check_timeout(np.int64(3)) == 3.0
    with pytest.raises(ValueError):
        remote.check_timeout(np.float64("nan"))


# -- a server that never answers ------------------------------------------------------------------


def test_silent_server_times_out_and_leaves_no_worker(silent: Server) -> None:
    import tvm.rpc  # noqa: F401 - imported first so the measured time is the wait alone

    before, start = set(threading.enumerate()), time.monotonic()
    with pytest.raises(TimeoutError, match=f"RPC server {silent.address} did not answer within 0.5 s"):
        remote.connect(silent.address, timeout=0.5)
    assert time.monotonic() - start < 5
    # its socket was shut down, so the handshake failed and the thread returned: nothing is left
    # to come back out of C++ while the interpreter exits
    assert new_threads(before) == []


def test_unblocking_spares_sockets_that_were_open_before(silent: Server) -> None:
    """Only the timed-out handshake's socket is shut down, not another connection to the same
    port (a session already open with the same board)."""
    with socket.create_connection(("127.0.0.1", int(silent.address.rpartition(":")[2])), timeout=5) as earlier:
        deadline = time.monotonic() + 5
        while not silent.accepted and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(TimeoutError):
            remote.connect(silent.address, timeout=0.3)
        earlier.sendall(b"still here")
        assert silent.read_from_first(64) == b"still here"


def test_a_timeout_spares_a_later_connect_to_the_same_port(silent: Server) -> None:
    """Two connects in flight to one port: the first one's deadline must not end the second."""
    import tvm.rpc  # noqa: F401 - imported first so both start together

    outcome: dict[str, tuple[str, float]] = {}

    def attempt(name: str, timeout: float) -> None:
        start = time.monotonic()
        try:
            remote.connect(silent.address, timeout)
            outcome[name] = ("connected", time.monotonic() - start)
        except (TimeoutError, ConnectionError) as err:
            outcome[name] = (type(err).__name__, time.monotonic() - start)

    first = threading.Thread(target=attempt, args=("first", 0.3))
    first.start()
    time.sleep(0.1)
    second = threading.Thread(target=attempt, args=("second", 1.5))
    second.start()
    for t in (first, second):
        t.join(10)
    assert outcome["first"][0] == "TimeoutError"
    assert outcome["second"][0] == "TimeoutError" and outcome["second"][1] >= 1.4, outcome


def test_refused_server_fails_at_once() -> None:
    holder, address = refused_address()
    before = set(threading.enumerate())
    with holder, pytest.raises(ConnectionError, match=f"RPC server {address} failed"):
        remote.connect(address, timeout=5)
    assert new_threads(before) == []


def test_silent_tracker_times_out(silent: Server) -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=f"RPC tracker {silent.address} did not answer within 0.5 s"):
        remote.check_tracker(silent.address, "arm64", timeout=0.5)
    assert time.monotonic() - start < 5


def test_refused_tracker_fails_at_once() -> None:
    holder, address = refused_address()
    start = time.monotonic()
    with holder, pytest.raises(ConnectionError, match=f"RPC tracker {address} failed"):
        remote.check_tracker(address, "arm64", timeout=5)
    assert time.monotonic() - start < 2  # TVM's own tracker client retries refusals for 60 s


def test_tracker_summary_lists_the_keys() -> None:
    """The exchange check_tracker does itself is the one TVM's tracker answers."""
    from tvm.rpc import base

    def tracker(conn: socket.socket) -> None:
        assert struct.unpack("<i", base.recvall(conn, 4))[0] == base.RPC_TRACKER_MAGIC
        conn.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        assert base.recvjson(conn) == [base.TrackerCode.SUMMARY]
        base.sendjson(conn, [base.TrackerCode.SUCCESS, {
            "server_info": [{"key": "server:arm64", "addr": ["127.0.0.1", 9190]}], "queue_info": {}}])

    server = Server(handle=tracker)
    try:
        remote.check_tracker(server.address, "arm64", timeout=5)
        with pytest.raises(ValueError, match=r"no device with key 'x86' \(it has: arm64\)"):
            remote.check_tracker(server.address, "x86", timeout=5)
    finally:
        server.close()


def test_not_a_tracker() -> None:
    server = Server(handle=lambda conn: (conn.recv(4), conn.sendall(b"HTTP")))
    try:
        with pytest.raises(ConnectionError, match="is not an RPC tracker"):
            remote.check_tracker(server.address, "arm64", timeout=5)
    finally:
        server.close()


# -- the process exits cleanly after a timeout ----------------------------------------------------

CHILD = """
import sys
import tvm.rpc
from ibert_tvm.remote import connect
try:
    connect(sys.argv[1], float(sys.argv[2]))
except TimeoutError:
    sys.exit(3)
except ConnectionError:
    sys.exit(4)
sys.exit(5)
"""


@pytest.mark.parametrize("close_after", [None, 0.35], ids=["never-answers", "hangs-up-just-after-the-deadline"])
def test_process_exits_cleanly_after_a_timeout(close_after: float | None) -> None:
    """A handshake still blocked in C++ when the process exits used to abort it ("terminate called
    without an active exception", exit 134) as soon as the server hung up during finalization;
    hanging up 50 ms after the 0.3 s deadline did that every time."""
    server = Server(close_after=close_after)
    try:
        child = subprocess.run([sys.executable, "-c", CHILD, server.address, "0.3"], cwd=REPO,
                               capture_output=True, text=True, timeout=SUBPROCESS_S)
    finally:
        server.close()
    assert "terminate called" not in child.stderr
    # a loaded machine may let the hang-up arrive before the deadline: then it is a ConnectionError
    assert child.returncode in ((3,) if close_after is None else (3, 4)), child.stderr[-2000:]


def test_process_exits_cleanly_after_a_bad_timeout() -> None:
    """The issue's case: `--rpc-timeout -1` against a closed port."""
    holder, address = refused_address()
    with holder:
        child = subprocess.run([sys.executable, "-c", "import sys\nfrom ibert_tvm.remote import connect\n"
                                "try:\n    connect(sys.argv[1], -1)\nexcept ValueError:\n    sys.exit(3)\n", address],
                               cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_S)
    assert child.returncode == 3 and "terminate called" not in child.stderr, child.stderr[-2000:]
