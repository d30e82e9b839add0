"""``GET /tickets/<serial>`` for many serials, for check 5 (``acknowledged-durable``).

A run acknowledges thousands of serials a second, and each is looked up on its own, so the
lookup is lean: a few threads, each with one keep-alive ``http.client`` connection.
"""

from __future__ import annotations

import http.client
import threading
import urllib.parse
from collections.abc import Sequence

__all__ = ["unsold_serials"]

#: Threads that look serials up at once, each with its own keep-alive connection.
LOOKUP_THREADS = 4


def unsold_serials(base_url: str, serials: Sequence[int], timeout: float = 5.0,
                   threads: int = LOOKUP_THREADS) -> tuple[list[int], str]:
    """The serials that answer 404 (not sold), and the first failure met ("" if none);
    a failure stops the lookup, so that a dead service does not take long to report."""
    parts = urllib.parse.urlsplit(base_url)
    factory = (http.client.HTTPSConnection if parts.scheme == "https"
               else http.client.HTTPConnection)
    prefix = parts.path.rstrip("/") + "/tickets/"
    missing: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def look(share: Sequence[int]) -> None:
        conn = factory(parts.netloc, timeout=timeout)
        try:
            for serial in share:
                if errors:
                    return
                try:
                    conn.request("GET", f"{prefix}{serial}")
                    response = conn.getresponse()
                    response.read()
                except (OSError, http.client.HTTPException) as exc:
                    with lock:
                        errors.append(f"GET {base_url}/tickets/{serial}: {exc!r}")
                    return
                if response.status == 404:
                    with lock:
                        missing.append(serial)
                elif response.status != 200:
                    with lock:
                        errors.append(f"GET {base_url}/tickets/{serial}: HTTP {response.status}")
        finally:
            conn.close()

    workers = [threading.Thread(target=look, args=(serials[i::threads],), daemon=True,
                                name=f"lookup-{i + 1}") for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sorted(missing), errors[0] if errors else ""
