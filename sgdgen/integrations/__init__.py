"""Adapters that put sgdgen's compiled step inside other frameworks' programs (jax.jit, jax.export)."""
