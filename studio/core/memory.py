"""Process memory: current RSS, and the peak RSS over a stretch of work, sampled by a background thread."""

import threading

import psutil

_process = psutil.Process()


def rss_bytes() -> int:
    return _process.memory_info().rss


class PeakRSS:
    """`with PeakRSS() as peak: ...` then `peak.bytes`: the highest RSS seen, sampled every `interval` s."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.bytes = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="peak-rss")

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.bytes = max(self.bytes, rss_bytes())

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.bytes = max(self.bytes, rss_bytes())
