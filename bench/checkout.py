"""Run as scripts from a checkout, the benchmarks import the pack as `fluxbridge` (installed, or by path)."""
import importlib.util
import sys
from pathlib import Path

try:
    import fluxbridge  # noqa: F401
except ImportError:
    _root = Path(__file__).resolve().parents[1]
    _spec = importlib.util.spec_from_file_location("fluxbridge", _root / "__init__.py",
                                                   submodule_search_locations=[str(_root)])
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["fluxbridge"] = _module
    _spec.loader.exec_module(_module)
