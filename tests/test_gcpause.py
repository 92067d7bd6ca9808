"""The collector is paused while an optimizer is built, loaded or takes its first step, and
restored after (sgdgen.runtime.gcpause): even when the call raises, and never enabled where the
caller had it disabled."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import sgdgen
from sgdgen.api.sgd import SGD
from sgdgen.runtime import gcpause


def test_paused_restores_the_collectors_state_even_on_error() -> None:
    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with gcpause.paused():
            assert not gc.isenabled()
            raise RuntimeError
    assert gc.isenabled()
    gc.disable()
    try:
        with gcpause.paused():
            pass
        assert not gc.isenabled()  # the caller's choice stands
    finally:
        gc.enable()


def test_first_step_and_build_pause_the_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []
    inner = SGD._apply_gradients

    def spy(self, *args, **kwargs):
        seen.append(gc.isenabled())
        return inner(self, *args, **kwargs)

    monkeypatch.setattr(SGD, "_apply_gradients", spy)
    v = sgdgen.Variable(np.ones(4, np.float32), name="v")
    opt = sgdgen.SGD(0.1, momentum=0.9)
    for _ in range(2):
        opt.apply_gradients([(np.ones(4, np.float32), v)])
    assert seen == [False, True] and gc.isenabled()  # paused for the first step only
    with pytest.raises(Exception):
        sgdgen.SGD(0.1).apply_gradients([(np.ones(3, np.float32), v)])  # shape mismatch on a first step
    assert gc.isenabled()
