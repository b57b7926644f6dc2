"""Peak resident memory of this process above a starting level, for the benchmarks' fresh child processes."""
import resource
import threading
import time


class PeakRSS:
    """Peak RSS above the level at entry: sampled every 5 ms in a thread, and the kernel's own high-water mark
    (`ru_maxrss`, exact) where that has risen above the entry level."""

    def __init__(self):
        import psutil
        self.proc = psutil.Process()
        self.peak = 0

    def __enter__(self):
        self.base = self.proc.memory_info().rss
        self._maxrss0 = _maxrss()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        if _maxrss() > self._maxrss0:  # the high-water mark moved during the block: it is this block's peak
            self.peak = max(self.peak, _maxrss())

    @property
    def above(self) -> int:
        """Bytes of the peak above the entry level."""
        return self.peak - self.base


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
