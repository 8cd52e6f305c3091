"""TVM RPC sessions with a deadline: a board that is down, or a port that accepts and never
answers, fails with a message that names the address instead of hanging."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"RPC address must be HOST:PORT, got {address!r}")
    return host, int(port)


def _with_deadline(what: str, fn: Callable[[], Any], timeout: float) -> Any:
    # TVM's handshake blocks in C++ with no timeout of its own: wait for it on a daemon thread
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below with the address
            result["error"] = err

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError(f"{what} did not answer within {timeout:g} s")
    if "error" in result:
        raise ConnectionError(f"{what} failed: {str(result['error']).splitlines()[-1]}") from result["error"]
    return result["value"]


def connect(address: str, timeout: float = 10.0) -> Any:
    """A session with `python -m tvm.exec.rpc_server` at HOST:PORT."""
    from tvm import rpc

    host, port = parse_address(address)
    return _with_deadline(f"RPC server {address}", lambda: rpc.connect(host, port), timeout)


def check_tracker(tracker: str, key: str, timeout: float = 10.0) -> None:
    """The RPC tracker at HOST:PORT answers and has a device registered under `key`."""
    from tvm import rpc

    host, port = parse_address(tracker)
    client = _with_deadline(f"RPC tracker {tracker}", lambda: rpc.connect_tracker(host, port), timeout)
    summary = _with_deadline(f"RPC tracker {tracker}", client.summary, timeout)
    client.close()
    # servers register as "server:KEY"
    keys = sorted({info["key"].split(":", 1)[-1] for info in summary.get("server_info", [])})
    if key not in keys:
        raise ValueError(f"RPC tracker {tracker} has no device with key {key!r} (it has: {', '.join(keys) or 'none'})")
