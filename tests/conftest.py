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
    """sgdgen's (and so JAX's) persistent compilation cache in an empty directory for one
    test module, so that cache hits and compile counts depend on that module alone.

    `configure_persistent_cache` keeps a directory already set in this process, so the path
    is passed explicitly as well as through SGDGEN_CACHE_DIR; the previous setting returns.
    """
    import jax
    from jax._src import compilation_cache

    from sgdgen.runtime import program

    path = tmp_path_factory.mktemp("xla-cache")
    previous = jax.config.jax_compilation_cache_dir
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SGDGEN_CACHE_DIR", str(path))
        assert program.configure_persistent_cache(path) == str(path)
        yield path
    jax.config.update("jax_compilation_cache_dir", previous)
    compilation_cache.reset_cache()
