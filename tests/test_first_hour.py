"""What a new user hits in the first hour (issue 8): each mistake gets a message in sgdgen's
own terms that says what to do, and a call that raises changes nothing."""

from __future__ import annotations

import os

import numpy as np
import pytest

import sgdgen


def _model() -> tuple[sgdgen.Variable, sgdgen.Variable]:
    return (sgdgen.Variable(np.ones((4, 2), np.float32), name="dense/kernel"),
            sgdgen.Variable(np.zeros(2, np.float32), name="dense/bias"))


def test_a_keras_variable_says_to_make_an_sgdgen_variable():
    os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras is first imported, as tests/test_parity.py
    import keras

    kv = keras.Variable(np.ones(3, np.float32), name="kernel")
    opt = sgdgen.SGD(0.1)
    with pytest.raises(TypeError) as e:
        opt.apply_gradients([(np.ones(3, np.float32), kv)])
    msg = str(e.value)
    assert msg.startswith("expected sgdgen.Variable, got keras.Variable 'kernel'; ")
    assert "sgdgen.Variable(value, layout=..., name='kernel')" in msg and "Variable.numpy()" in msg
    assert not opt._built and int(opt.iterations.numpy()) == 0


def test_a_plain_array_says_to_wrap_it():
    with pytest.raises(TypeError, match=r"^expected sgdgen.Variable, got numpy.ndarray; wrap arrays with "
                                        r"sgdgen.Variable\(array, layout=\.\.\., name=\.\.\.\)"):
        sgdgen.SGD(0.1).apply_gradients([(np.ones(3, np.float32), np.ones(3, np.float32))])


def test_a_swapped_pair_says_the_pairs_are_gradient_variable():
    w, b = _model()
    opt = sgdgen.SGD(0.1)
    before = w.numpy()
    with pytest.raises(TypeError, match=r"^grads_and_vars\[1\] is \(Variable 'dense/bias:0', ndarray\): the pairs "
                                        r"are \(gradient, variable\); swap them, e\.g\. zip\(grads, variables\)"):
        opt.apply_gradients([(np.ones((4, 2), np.float32), w), (b, np.ones(2, np.float32))])
    assert not opt._built and np.array_equal(w.numpy(), before)


def test_unknown_variable_after_load_artifact_says_how_to_build(tmp_path):
    w, b = _model()
    opt = sgdgen.SGD(0.1, momentum=0.9)
    opt.build([w])
    opt.save_artifact(tmp_path / "step.sgd")
    w2, b2 = _model()
    loaded = sgdgen.SGD.load_artifact(tmp_path / "step.sgd", [w2])
    with pytest.raises(KeyError) as e:
        loaded.apply_gradients([(np.ones((4, 2), np.float32), w2), (np.ones(2, np.float32), b2)])
    msg = str(e.value)
    assert "cannot recognize variable dense/bias:0: its slots were built for ['dense/kernel:0']" in msg
    assert "SGD.load_artifact(path, variables)" in msg and "legacy" not in msg and "tf.keras" not in msg
    assert int(loaded.iterations.numpy()) == 0


def test_misspelt_argument_names_sgd_and_the_closest():
    with pytest.raises(TypeError, match=r"^`momentun` is not a valid argument of sgdgen.SGD\. Did you mean "
                                        r"`momentum`\? Valid arguments of sgdgen.SGD: learning_rate, momentum, "):
        sgdgen.SGD(0.1, momentun=0.9)


def test_readme_mesh_forms_work_in_the_constructor():
    import jax

    jm = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("batch", "model"))
    assert sgdgen.Mesh("batch=2,model=4") == sgdgen.Mesh(jm) == sgdgen.Mesh({"batch": 2, "model": 4})
    with pytest.raises(sgdgen.SpecError, match="names mesh axis 'modle'.*mesh has axes \\['batch', 'model'\\]"):
        sgdgen.Layout(["unsharded", "modle"], sgdgen.Mesh("batch=2,model=4"))
