"""Test session set-up: eight simulated CPU devices for the multi-device tests.

XLA reads the flag when the CPU client starts, so it is set before anything
imports jax. Single-device tests use device 0 of the same eight.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
