"""Worst error of the compiled step against sgdgen.reference over the test matrices.

    python bench/worst_error.py      (from the repository root; about a minute on 2 cores)

Runs the option cases of tests/test_numerics.py on one device as stage 0 and lowered,
every schedule lowered, and the full combination on every mesh of
tests/test_partitioned.py (8 simulated CPU devices), 10 steps each, and prints the worst
float32 error as a fraction of max|ref| and the worst 16-bit error in ulps of scale.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import conftest  # noqa: E402,F401  (8 simulated devices, before jax starts)
import test_numerics as tn  # noqa: E402
import test_partitioned as tp  # noqa: E402
from stepdriver import run_against_reference  # noqa: E402

from sgdgen.frontend.config import SGDConfig  # noqa: E402
from sgdgen.codegen.pipeline import run_pipeline  # noqa: E402
from sgdgen.frontend.spec import Mesh  # noqa: E402


def main() -> None:
    f32, half, cases = 0.0, 0.0, 0
    for kw, dtype, exclude in tn.CASES.values():
        for transform in (None, run_pipeline):
            r = run_against_reference(SGDConfig.create(**kw), tn.model(dtype, exclude_bias=exclude), tn.ONE_DEVICE,
                                      steps=10, transform=transform)
            cases += 1
            if dtype == "float32":
                f32 = max(f32, r.max_rel)
            else:
                half = max(half, r.max_ulps)
    for schedule in tn.SCHEDULES.values():
        r = run_against_reference(SGDConfig.create(learning_rate=schedule, momentum=0.9), tn.model(), tn.ONE_DEVICE,
                                  steps=10, transform=run_pipeline)
        cases, f32 = cases + 1, max(f32, r.max_rel)
    for text in tp.MESHES:
        mesh = Mesh.parse(text)
        for clip in ("global_clipnorm", "clipnorm"):
            config = SGDConfig.create(learning_rate=0.1, **tp.FULL, **{clip: 1.0})
            r = run_against_reference(config, tp.model(mesh), mesh, steps=10, transform=run_pipeline)
            cases, f32 = cases + 1, max(f32, r.max_rel)
    print(f"{cases} cases x 10 steps: worst float32 error {f32:.3g} of max|ref|; worst 16-bit error {half:.3g} ulp")


if __name__ == "__main__":
    main()
