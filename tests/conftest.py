"""Test session set-up: eight simulated CPU devices for the multi-device tests.

XLA reads the flag when the CPU client starts, so it is set before anything
imports jax. Single-device tests use device 0 of the same eight.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def private_xla_cache(tmp_path_factory: pytest.TempPathFactory):
    """sgdgen's executable cache (memory and disk) empty and private to one test module, so that
    cache hits and compile counts depend on that module alone; the previous cache returns after."""
    from sgdgen.runtime.cache import ExecutableCache, set_default_cache

    path = tmp_path_factory.mktemp("xla-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SGDGEN_CACHE_DIR", str(path))  # what subprocesses of the test see
        previous = set_default_cache(ExecutableCache(path))
        try:
            yield path
        finally:
            set_default_cache(previous)


@pytest.fixture(scope="module")
def subprocess_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a child process of a test: 8 CPU devices, a private executable cache
    for the module, quiet XLA logs."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    e.update(SGDGEN_CACHE_DIR=str(tmp_path_factory.mktemp("xla-cache")), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8", TF_CPP_MIN_LOG_LEVEL="1")
    return e
