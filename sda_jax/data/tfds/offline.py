"""Is the internet there? A bounded probe of a download host, so offline machines fail in seconds.

TFDS retries a failed download ten times with exponential back-off (about 3.5 minutes when a host
name does not resolve). Code that would download probes the host first and raises `OfflineError`
at once when nothing answers.
"""

from __future__ import annotations

import socket
import threading
import urllib.parse

# Seconds allowed to resolve a download host and connect to it before calling the machine offline.
PROBE_TIMEOUT_S = 10.0


class OfflineError(ConnectionError):
    """A download host cannot be reached (no network, or none within the probe timeout)."""


def probe_host(url: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raises OfflineError unless a TCP connection to the URL's host opens within `timeout` s.

    Name resolution has no timeout of its own (the system resolver may retry for 20 s or more),
    so the attempt runs on a daemon thread that is abandoned when the time is up.
    """
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    outcome: list[OSError | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(err)

    thread = threading.Thread(target=connect, name=f"probe-{host}", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise OfflineError(f"cannot reach {host}:{port} (no answer within {timeout:g} s)")
    if outcome[0] is not None:
        raise OfflineError(f"cannot reach {host}:{port} ({outcome[0].strerror or outcome[0]})")
