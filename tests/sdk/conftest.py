"""The official Azure IoT device SDK against the real binary. Reuses the
harness of tests/python (process start, ephemeral data dir, logs)."""

import importlib.util
import sys
from pathlib import Path

_here = Path(__file__).resolve()
sys.path.insert(0, str(_here.parents[1] / "python"))
_spec = importlib.util.spec_from_file_location("edgehub_harness", _here.parents[1] / "python" / "conftest.py")
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)

binary = harness.binary
start_hub = harness.start_hub
