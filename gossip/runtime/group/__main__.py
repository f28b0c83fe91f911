"""``python -m gossip.runtime.group worker ...``: serve one worker of a coded group."""

import os
import sys

from .worker import main

if __name__ == "__main__":
    exit_code = main()
    # Interpreter teardown with torch loaded takes seconds on a busy machine, and the transport
    # is already closed: leave at once, so a stopped group is gone promptly.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
