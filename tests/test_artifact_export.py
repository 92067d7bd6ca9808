"""An artifact carries the step as a serialized jax.export module (`step.jaxexport`, hashed in the
manifest) for the platforms asked for; a process that never imports sgdgen deserializes it and
runs it, eagerly and inside its own jit, with the same results as `SGD.apply_gradients`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sgdgen
from sgdgen.errors import ArtifactError
from sgdgen.io import artifact

CONSUMER = r"""
import json, sys
import numpy as np
import jax
root = sys.argv[1]
manifest = json.load(open(f"{root}/manifest.json"))
entry = manifest["jax_export"]
exported = jax.export.deserialize(bytearray(open(f"{root}/{entry['file']}", "rb").read()))
data = np.load(sys.argv[2])
args = [data[f"arg{k}"] for k in range(len(manifest["abi"]["inputs"]))]
eager = exported.call(*args)
jitted = jax.jit(exported.call)(*args)
np.savez(sys.argv[3], **{f"eager{k}": np.asarray(x) for k, x in enumerate(eager)},
         **{f"jit{k}": np.asarray(x) for k, x in enumerate(jitted)})
print(json.dumps({"platforms": list(exported.platforms), "sgdgen_imported": any(m.startswith("sgdgen") for m in sys.modules)}))
"""


def _optimizer() -> tuple[sgdgen.SGD, list[sgdgen.Variable]]:
    rng = np.random.default_rng(3)
    w = sgdgen.Variable(rng.standard_normal((4, 3)).astype(np.float32), name="w")
    b = sgdgen.Variable(np.zeros(3, np.float32), name="b")
    opt = sgdgen.SGD(0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, global_clipnorm=1.0, use_ema=True)
    opt.build([w, b])
    return opt, [w, b]


def test_artifact_carries_a_jax_export_module_that_runs_without_sgdgen(tmp_path: Path) -> None:
    opt, (w, b) = _optimizer()
    out = opt.save_artifact(tmp_path / "step.sgd", platforms=["cpu", "cuda", "tpu"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["jax_export"] == {"file": "step.jaxexport", "platforms": ["cpu", "cuda", "tpu"]}
    assert "step.jaxexport" in manifest["files"]
    rng = np.random.default_rng(4)
    grads = [rng.standard_normal(v.shape).astype(np.float32) for v in (w, b)]
    before = [np.int32(opt.iterations.numpy()), w.numpy(), b.numpy(), *(s.numpy() for s in opt._momenta),
              *(s.numpy() for s in opt._averages), *grads, np.float32(0.1)]
    np.savez(tmp_path / "args.npz", **{f"arg{k}": a for k, a in enumerate(before)})
    opt.apply_gradients(zip(grads, (w, b)))
    after = [opt.iterations.numpy(), w.numpy(), b.numpy(), *(s.numpy() for s in opt._momenta),
             *(s.numpy() for s in opt._averages)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", CONSUMER, str(out), str(tmp_path / "args.npz"), str(tmp_path / "out.npz")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report == {"platforms": ["cpu", "cuda", "tpu"], "sgdgen_imported": False}
    got = np.load(tmp_path / "out.npz")
    for k, want in enumerate(after):
        np.testing.assert_array_equal(got[f"eager{k}"], want)
        np.testing.assert_array_equal(got[f"jit{k}"], want)


def test_the_exported_module_is_verified_and_optional(tmp_path: Path) -> None:
    opt, _ = _optimizer()
    plain = opt.save_artifact(tmp_path / "plain.sgd", platforms=())
    assert "jax_export" not in json.loads((plain / "manifest.json").read_text())
    with pytest.raises(ArtifactError, match="carries no jax.export module"):
        artifact.read(plain).jax_exported()
    full = opt.save_artifact(tmp_path / "full.sgd")
    assert artifact.read(full).jax_exported().platforms == ("cpu",)
    blob = bytearray((full / "step.jaxexport").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (full / "step.jaxexport").write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="step.jaxexport"):
        artifact.read(full)
    with pytest.raises(ArtifactError, match="platforms"):
        opt.save_artifact(tmp_path / "bad.sgd", platforms=["gpu9"])


def test_compile_takes_platforms(tmp_path: Path) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"learning_rate": 0.1, "momentum": 0.9}))
    variables = tmp_path / "v.json"
    variables.write_text(json.dumps([{"name": "w", "shape": [4], "dtype": "float32"}]))
    run = [sys.executable, "-m", "sgdgen.tools.cli", "compile", "--config", str(config), "--vars", str(variables)]
    r = subprocess.run([*run, "-o", str(tmp_path / "a.sgd"), "--platforms", "cpu,cuda"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "a.sgd" / "manifest.json").read_text())["jax_export"]["platforms"] == ["cpu", "cuda"]
    r = subprocess.run([*run, "-o", str(tmp_path / "b.sgd"), "--platforms", "cpu,warp9"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "warp9" in r.stderr and not (tmp_path / "b.sgd").exists()
