"""Drive several in-process nodes at once: one thread per node, errors surfaced in the test."""

from __future__ import annotations

import threading


def in_threads(body, keys, timeout_s: float = 50.0) -> None:
    """Run ``body(key)`` for every key in its own thread; re-raise what any of them raised."""
    errors = []

    def guarded(key):
        try:
            body(key)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(key,)) for key in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    assert not errors, errors
