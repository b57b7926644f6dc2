"""Resident memory in the benchmarks' fresh child processes: the peak above a starting level (PeakRSS), every
page of a model's weights brought in (touch), and the fresh process itself (fresh_process)."""
import json
import resource
import subprocess
import sys
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


def touch(module) -> None:
    """Read one byte of every 4 KiB of every parameter: weights that are views of a mapped file come in as
    they are read, so afterwards the model is as resident as one whose weights are copies."""
    import torch
    for p in module.parameters():
        p.detach().reshape(-1).view(torch.uint8)[::4096].sum()


def fresh_process(script, *argv) -> dict:
    """Run `script` with `argv` in a fresh Python (its own imports, its own peak RSS); the JSON object its last
    line of output holds."""
    done = subprocess.run([sys.executable, str(script), *map(str, argv)], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])
