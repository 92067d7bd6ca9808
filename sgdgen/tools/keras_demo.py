"""`sgdgen demo --keras`: the same small Keras 3 model trained twice, once with
`sgdgen.keras.SGD` (the generated step inside Keras' jitted train step) and once with Keras'
own `keras.optimizers.SGD`, from the same initial weights on the same batches, with a config
where the two follow the same rules (momentum + Nesterov + decoupled weight decay; see
`sgdgen.integrations.keras.KERAS3_DIFFERENCES` for where they part).

Model: an MNIST-sized classifier on synthetic data (784 -> 64 -> 10, softmax cross-entropy,
1,024 samples, batches of 64). The verdict compares the final weights.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

#: PASS when the two runs' final weights agree within this, relative to the largest weight.
#: Both round every op in float32; they may differ by the FMA contraction XLA picks for each
#: program (about 1 ulp, 6e-8 relative, per weight per step), and such differences grow at most
#: linearly over the demo's steps at these learning rates (16 steps an epoch, 3 epochs: 48 steps
#: -> about 3e-6). 1e-5 leaves room for that; a rule that differs (a decay or Nesterov term
#: applied otherwise) moves the weights by 1e-3 and more.
MAX_REL_DIFF = 1e-5
CONFIG = dict(learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)


@dataclass
class KerasDemoResult:
    sgdgen_losses: list[float]
    keras_losses: list[float]
    max_rel_diff: float
    seconds: float
    epochs: int

    @property
    def passed(self) -> bool:
        return self.max_rel_diff <= MAX_REL_DIFF and self.sgdgen_losses[-1] < self.sgdgen_losses[0]

    def verdict(self) -> str:
        word = "PASS" if self.passed else "FAIL"
        return (f"{word}: sgdgen.keras.SGD vs keras.optimizers.SGD ({', '.join(f'{k}={v}' for k, v in CONFIG.items())}), "
                f"{self.epochs} epochs of Keras model.fit: final weights within {self.max_rel_diff:.2g} of each other "
                f"relative to the largest weight (allowed {MAX_REL_DIFF:g}); one device (no keras.distribution set)")


def _data(n: int = 1024, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 784)).astype(np.float32)
    w = rng.standard_normal((784, 10)).astype(np.float32) / 28.0
    return x, np.argmax(x @ w, axis=1).astype(np.int32)


def _fit(optimizer: Any, epochs: int, x: np.ndarray, y: np.ndarray) -> tuple[Any, list[float]]:
    import keras

    keras.utils.set_random_seed(7)  # the same initial weights for both runs
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(64, activation="relu", name="hidden"),
                              keras.layers.Dense(10, name="logits")])
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, epochs=epochs, batch_size=64, shuffle=False, verbose=0)
    return model, [float(v) for v in history.history["loss"]]


def run_keras_demo(epochs: int = 3, console: Any = None) -> KerasDemoResult:
    """Trains both runs and compares them (Keras 3 on the JAX backend)."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    import sgdgen

    if keras.backend.backend() != "jax":
        raise RuntimeError(f"sgdgen demo --keras needs Keras' JAX backend (KERAS_BACKEND=jax), not "
                           f"{keras.backend.backend()!r}")
    x, y = _data()
    t0 = time.perf_counter()
    ours, our_losses = _fit(sgdgen.keras.SGD(**CONFIG), epochs, x, y)
    theirs, their_losses = _fit(keras.optimizers.SGD(**CONFIG), epochs, x, y)
    seconds = time.perf_counter() - t0
    a, b = ours.get_weights(), theirs.get_weights()
    scale = max(float(np.abs(w).max()) for w in b)
    diff = max(float(np.abs(p - q).max()) for p, q in zip(a, b)) / scale
    if console is not None:
        for k, (l1, l2) in enumerate(zip(our_losses, their_losses), 1):
            console.print(f"epoch {k}: loss sgdgen.keras.SGD {l1:.6f}   keras.optimizers.SGD {l2:.6f}")
    return KerasDemoResult(our_losses, their_losses, diff, seconds, epochs)
