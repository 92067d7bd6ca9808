"""Builds sgdgen's optional CPU kernel library (csrc/*.cc) against the XLA FFI headers
that jaxlib ships (`jax.ffi.include_dir()`); everything else is in pyproject.toml.

The library is optional: without a C++ compiler, or without jaxlib's headers, the install
succeeds with a warning and sgdgen runs XLA's own code for every step
(sgdgen.runtime.cpu_kernels). It is a plain shared library loaded with ctypes, not a
Python extension module; setuptools builds it only because it knows how to find a compiler.
"""

from __future__ import annotations

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _ffi_include_dir() -> str | None:
    try:
        import jaxlib
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(jaxlib.__file__), "include")
    return path if os.path.isfile(os.path.join(path, "xla", "ffi", "api", "ffi.h")) else None


class _OptionalKernels(build_ext):
    """Skips the kernel library, with a warning, when jaxlib's FFI headers are missing."""

    def build_extension(self, ext: Extension) -> None:
        include = _ffi_include_dir()
        if include is None:
            self.warn("sgdgen: jaxlib's XLA FFI headers not found; building without the CPU kernels")
            return
        ext.include_dirs.append(include)
        super().build_extension(ext)


KERNELS = Extension(
    "sgdgen.runtime._cpu_kernels",
    sources=["csrc/sum_squares.cc", "csrc/sgd_update.cc"],
    depends=["csrc/parallel.h"],
    language="c++",
    extra_compile_args=["-std=c++17", "-O3", "-ffp-contract=off", "-Wno-attributes", "-Wno-return-type"],
    optional=True,  # a failed compile leaves sgdgen without its kernels, not uninstallable
)

setup(ext_modules=[KERNELS], cmdclass={"build_ext": _OptionalKernels})
