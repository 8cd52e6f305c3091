"""TVM RPC sessions with a deadline: a board that is down, or a port that accepts and never
answers, fails with a message that names the address instead of hanging.

TVM's `rpc.connect` handshakes in C++ with no timeout of its own, so it runs on a worker thread
that the caller stops waiting for. Such a worker must not be left blocked: if its C++ call
returns while the interpreter finalizes (the board closes the socket a moment later), it takes
the GIL in tvm_ffi's ~TVMFFIPyCallContext, CPython 3.11 ends the thread there with pthread_exit,
and that unwind through a (noexcept) destructor aborts the process with "terminate called
without an active exception". So a timed-out worker's socket is shut down, which makes the
handshake fail at once and the worker finish normally, and whatever is still blocked at exit
gets one more try from an atexit hook (atexit runs before finalization).
"""

from __future__ import annotations

import atexit
import math
import numbers
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# how long to keep shutting down a timed-out handshake's socket until its worker has returned:
# shutdown ends a blocked recv/connect within milliseconds, the rest is for a worker that has
# not opened its socket yet (still resolving the host name)
_UNBLOCK_S = 2.0
_UNBLOCK_STEP_S = 0.05
# longer waits overflow the C timeouts behind Thread.join and socket.settimeout, and are forever
_LONGEST_WAIT_S = 365 * 86400.0


def check_timeout(timeout: object) -> float:
    """`timeout` in seconds as a float; ValueError unless it is a positive finite number."""
    # bool is an int, so `True` would quietly mean 1 s; NaN, inf and values <= 0 make join()
    # wait forever or not at all, the latter leaving the handshake running into interpreter exit
    if not isinstance(timeout, bool) and isinstance(timeout, numbers.Real):
        try:
            seconds = float(timeout)
        except OverflowError:  # an int beyond float range: not a finite number of seconds either
            seconds = math.inf
        if math.isfinite(seconds) and seconds > 0:
            return seconds
    raise ValueError(f"RPC timeout must be a positive number of seconds, got {timeout!r}")


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"RPC address must be HOST:PORT, got {address!r}")
    return host, int(port)


# -- unblocking a handshake stuck in C++ ----------------------------------------------------------

_Sockets = frozenset[tuple[int, int]]  # (fd, inode) of open sockets: the inode tells a reused fd apart


def _open_sockets() -> _Sockets:
    """This process's open sockets; empty where the fd table cannot be listed (then no unblocking)."""
    for table in ("/proc/self/fd", "/dev/fd"):
        try:
            names = os.listdir(table)
        except OSError:
            continue
        found = set()
        for name in names:
            try:
                fd = int(name)
                info = os.fstat(fd)
            except (ValueError, OSError):  # the listing's own fd, closed by now
                continue
            if stat.S_ISSOCK(info.st_mode):
                found.add((fd, info.st_ino))
        return frozenset(found)
    return frozenset()


def _connecting_remote_port(inode: int) -> int | None:
    """The remote port of a TCP socket that is still connecting (no answer to its SYN yet), which
    getpeername() does not tell; Linux lists it in /proc/net/tcp*. None elsewhere."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as rows:
                next(rows, None)  # the header
                for row in rows:
                    fields = row.split()
                    if len(fields) > 9 and fields[9] == str(inode):
                        return int(fields[2].rpartition(":")[2], 16)
        except (OSError, ValueError):
            continue
    return None


@dataclass(eq=False)
class _Handshake:
    """A connect's worker thread, the sockets open when it started, and the port it dials."""

    worker: threading.Thread
    before: _Sockets
    port: int


# handshakes from the oldest whose worker may still be running on, oldest first
_pending: list[_Handshake] = []
_pending_lock = threading.Lock()


def _own_sockets(h: _Handshake) -> set[tuple[int, int]]:
    """The sockets that can only be `h`'s: opened since it started, and, when a later connect to
    the same port is in flight, already open when that one started (its own socket was not)."""
    mine = set(_open_sockets() - h.before)
    with _pending_lock:
        later = _pending[_pending.index(h) + 1:] if h in _pending else []
    for other in later:  # finished ones too: a later connect that succeeded holds a live session
        if other.port == h.port:
            mine &= other.before
    return mine


def _shut_down(h: _Handshake) -> None:
    """Shut down `h`'s TCP socket to its port, so that TVM's blocked connect/recv/send returns an
    error. Sockets that were already open, such as a live session with the same board, stay."""
    for fd, inode in _own_sockets(h):
        try:
            sock = socket.socket(fileno=os.dup(fd))  # a second handle: closing it keeps TVM's fd open
        except OSError:  # closed meanwhile
            continue
        with sock:
            try:
                if os.fstat(sock.fileno()).st_ino != inode or sock.type != socket.SOCK_STREAM:
                    continue
                if sock.family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                try:
                    remote_port = sock.getpeername()[1]
                except OSError:  # not connected yet
                    remote_port = _connecting_remote_port(inode)
                if remote_port == h.port:
                    sock.shutdown(socket.SHUT_RDWR)  # acts on the socket itself, not on this handle
            except OSError:  # it went away or was never connected: nothing is blocked on it
                continue


def _unblock(h: _Handshake, until: float) -> None:
    # bounded by time; the socket may appear only after a few steps (DNS first)
    while h.worker.is_alive() and time.monotonic() < until:
        _shut_down(h)
        h.worker.join(_UNBLOCK_STEP_S)


@atexit.register
def _unblock_pending_at_exit() -> None:
    """Last chance for workers that did not return: after atexit, a returning one aborts the process."""
    with _pending_lock:
        pending = [h for h in _pending if h.worker.is_alive()]
    until = time.monotonic() + _UNBLOCK_S
    for h in pending:
        _unblock(h, until)
    # a worker still alive here is blocked where no socket reaches it (a DNS lookup); it ends with
    # the process, and aborts only if its call returns during the few milliseconds of finalization


def _with_deadline(what: str, fn: Callable[[], Any], timeout: float, port: int) -> Any:
    """fn() on a worker thread, or TimeoutError after `timeout` s; `port` is the one fn connects to."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below with the address
            result["error"] = err

    # daemon: a worker that cannot be unblocked must not keep the process alive
    h = _Handshake(threading.Thread(target=run, name=f"ibert-tvm {what}", daemon=True), _open_sockets(), port)
    with _pending_lock:
        # forget what is older than every running worker: only later handshakes matter to one
        alive = [i for i, p in enumerate(_pending) if p.worker.is_alive()]
        del _pending[:alive[0] if alive else len(_pending)]
        _pending.append(h)
    h.worker.start()
    h.worker.join(min(timeout, _LONGEST_WAIT_S))
    if h.worker.is_alive():
        _unblock(h, time.monotonic() + _UNBLOCK_S)
        # whatever the worker got after the deadline (an error from the shutdown, or a session
        # that came too late) is dropped: the caller was promised an answer within `timeout`
        raise TimeoutError(f"{what} did not answer within {timeout:g} s")
    if "error" in result:
        raise ConnectionError(f"{what} failed: {str(result['error']).splitlines()[-1]}") from result["error"]
    return result["value"]


# -- the public calls -----------------------------------------------------------------------------


def connect(address: str, timeout: float = 10.0) -> Any:
    """A session with `python -m tvm.exec.rpc_server` at HOST:PORT."""
    timeout = check_timeout(timeout)
    host, port = parse_address(address)
    from tvm import rpc

    return _with_deadline(f"RPC server {address}", lambda: rpc.connect(host, port), timeout, port)


def check_tracker(tracker: str, key: str, timeout: float = 10.0) -> None:
    """The RPC tracker at HOST:PORT answers and has a device registered under `key`."""
    timeout = check_timeout(timeout)
    host, port = parse_address(tracker)
    from tvm.rpc import base

    what = f"RPC tracker {tracker}"
    deadline = time.monotonic() + min(timeout, _LONGEST_WAIT_S)

    def time_left(sock: socket.socket) -> None:
        # socket timeouts are per call: spread one deadline over the steps of the exchange
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)

    # The tracker speaks plain Python sockets, so its exchange (TVM's TrackerSession.summary)
    # is done here on a socket with a timeout: no thread is left behind, and a refused port
    # fails at once instead of TVM's 60 s of retries.
    try:
        with socket.create_connection((host, port), timeout=min(timeout, _LONGEST_WAIT_S)) as sock:
            time_left(sock)
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            time_left(sock)
            magic = struct.unpack("<i", base.recvall(sock, 4))[0]
            reply: Any = None
            if magic == base.RPC_TRACKER_MAGIC:
                time_left(sock)
                base.sendjson(sock, [base.TrackerCode.SUMMARY])
                time_left(sock)
                reply = base.recvjson(sock)
    except TimeoutError as err:
        raise TimeoutError(f"{what} did not answer within {timeout:g} s") from err
    except (OSError, ValueError) as err:  # ValueError: an answer that is not JSON
        raise ConnectionError(f"{what} failed: {err}") from err
    if magic != base.RPC_TRACKER_MAGIC:
        raise ConnectionError(f"{what} is not an RPC tracker")
    if not (isinstance(reply, list) and len(reply) == 2 and reply[0] == base.TrackerCode.SUCCESS):
        raise ConnectionError(f"{what} failed: unexpected answer {reply!r}")
    # servers register as "server:KEY"
    keys = sorted({info["key"].split(":", 1)[-1] for info in reply[1].get("server_info", [])})
    if key not in keys:
        raise ValueError(f"RPC tracker {tracker} has no device with key {key!r} (it has: {', '.join(keys) or 'none'})")
