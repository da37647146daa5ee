"""A minimal client of the nbd-mc control protocol (docs/control-protocol.md).

Newline-delimited JSON over a unix socket: the server greets first, then each
request line gets one reply line. Kept here, small and synchronous, so that the
commit-latency figures measure the server and one socket round trip, not a
client library.
"""

import json
import socket


class ControlError(Exception):
    def __init__(self, cls, desc):
        super().__init__(f"{cls}: {desc}")
        self.error_class = cls
        self.desc = desc


class Control:
    def __init__(self, path, timeout=600.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")
        self.greeting = self._read()
        self._id = 0

    def _read(self):
        line = self.file.readline()
        if not line:
            raise ConnectionError("control connection closed")
        return json.loads(line)

    def execute(self, command, **arguments):
        """Send one request and return its `return` object (or raise)."""
        self._id += 1
        req = {"execute": command, "id": self._id}
        if arguments:
            req["arguments"] = arguments
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        while True:
            reply = self._read()
            if reply.get("id") == self._id or "id" not in reply:
                break  # anything else would be an event: skip it
        if "error" in reply:
            err = reply["error"]
            raise ControlError(err.get("class", "?"), err.get("desc", ""))
        return reply.get("return", {})

    def close(self):
        try:
            self.file.close()
        finally:
            self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
