"""The Node.js SDK suite runs on the same harness as the Python SDK suite
(tests/sdk/conftest.py, which loads tests/python's)."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "edgehub_sdk_harness", Path(__file__).resolve().parents[1] / "sdk" / "conftest.py")
_sdk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sdk)

binary = _sdk.binary
start_hub = _sdk.start_hub
start_sdk_gateway = _sdk.start_sdk_gateway
