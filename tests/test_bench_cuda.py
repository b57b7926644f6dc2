"""bench/bench_cuda.py runs on a machine without a GPU: its --dry-run goes through every code path on tiny CPU
models, here the VRAM-cap sweep (ours with group offloading, diffusers' model and group offloading)."""
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_cuda.py"


def test_vram_cap_sweep_dry_run():
    done = subprocess.run([sys.executable, str(BENCH), "--dry-run", "--vram-gb", "12", "--steps", "2"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "cap 12 GiB (not enforced)" in out and "failed" not in out, out
    for way in ("ours", "diffusers model offload", "diffusers group offload"):
        assert any(line.strip().startswith(way) and "it/s" in line for line in out.splitlines()), (way, out)
    assert "transformer group-offloaded, VAE group-offloaded" in out
    assert out.count("it/s ours / ") == 2 and "every code path ran" in out
