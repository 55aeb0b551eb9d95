"""tests/mock_provider.py's MockProvider as a process of its own, for the benchmarks.

A process, not a thread of the benchmark, so that the mock's CPU is not mixed with what is measured; uvloop
when installed, so that the mock is as cheap as it can be (every system under test pays for it equally).
Prints its base URL on stdout, then serves until stdin closes or SIGTERM.

    python bench/mock_process.py REQUIRED_KEY
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from mock_provider import MockProvider


def main() -> None:
    try:
        import uvloop
        uvloop.install()  # MockProvider's asyncio.new_event_loop() then makes a uvloop loop
    except ImportError:
        pass
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with MockProvider(required_key=sys.argv[1]) as mock:
        print(mock.base_url, flush=True)
        threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
        while not done.wait(1):
            mock.clear()  # it records every request: under load that is memory, not information


if __name__ == "__main__":
    main()
