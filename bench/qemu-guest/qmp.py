"""Minimal QMP client (stdlib only) for the QEMU reference peer.

Owns: one QMP connection over a unix socket: greeting, capability
negotiation, synchronous commands with a timeout. Asynchronous events are
kept in `events` and otherwise ignored.
Does not own: starting QEMU or any migration logic (see peer_run.py).
"""
import json
import socket
import time


class QmpError(Exception):
    """A QMP command failed, the socket closed, or QEMU did not answer in time."""


class Qmp:
    """A negotiated QMP session. Every call is bounded by `timeout` seconds."""

    def __init__(self, path: str, timeout: float = 10.0, connect_timeout: float = 30.0):
        self.timeout = timeout
        self.events = []
        self._buf = b""
        deadline = time.monotonic() + connect_timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                sock.close()
                # QEMU creates the socket a moment after it starts.
                if time.monotonic() > deadline:
                    raise QmpError(f"cannot connect to {path}: {e}") from e
                time.sleep(0.05)
        self._sock = sock
        greeting = self._read_msg()
        if "QMP" not in greeting:
            raise QmpError(f"unexpected greeting: {greeting}")
        self.cmd("qmp_capabilities")
        self.version = greeting["QMP"]["version"]["qemu"]

    def _read_msg(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self._buf:
            if time.monotonic() > deadline:
                raise QmpError("timed out waiting for QMP message")
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout as e:
                raise QmpError("timed out waiting for QMP message") from e
            if not chunk:
                raise QmpError("QMP socket closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name: str, **args):
        """Run one command and return its `return` value; raise QmpError on `error`."""
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise QmpError(f"{name}: send failed: {e}") from e
        while True:
            reply = self._read_msg()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QmpError(f"{name}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def close(self):
        try:
            self._sock.close()
        except OSError:
            pass
