"""What XLA makes of the lowered step: fusions, all-reduces, temporary memory.

    python bench/fusions.py

Model: 8 variables of 2048x2048 float32 (4M parameters each), every option on
(momentum, Nesterov, weight decay, EMA with overwrite) with global_clipnorm and with
clipnorm, one device. Prints the ENTRY computation's instructions by kind, how many
fusions write a full-size tensor, and XLA's temporary bytes against the state's bytes.
"""

import re
from collections import Counter

from sgdgen import backend
from sgdgen.frontend.config import SGDConfig
from sgdgen.runtime import cpu_kernels
from sgdgen.runtime.program import StepProgram
from sgdgen.frontend.spec import Mesh, VarSpec


def main() -> None:
    mesh = Mesh(())
    specs = tuple(VarSpec.create(f"w{i}", [2048, 2048], "float32", mesh) for i in range(8))
    state_bytes = sum(v.nbytes for v in specs) * 3 + 8
    for clip in ("global_clipnorm", "clipnorm"):
        config = SGDConfig.create(learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=0.05, use_ema=True,
                                  ema_overwrite_frequency=4, **{clip: 1.0})
        exe = cpu_kernels.compile_text(StepProgram(config, specs, mesh).lowered_text, backend.devices_for([0]))
        hlo = backend.hlo_text(exe)
        entry = [line for line in hlo[hlo.index("ENTRY"):].splitlines()[1:] if " = " in line]
        kinds = Counter(m.group(1) for line in entry if (m := re.search(r"= (?:\S+|\(.*?\)) ([\w-]+)\(", line)))
        full = sum(1 for line in entry if " fusion(" in line and "f32[2048,2048]" in line.split(" fusion(")[0])
        temp = backend.memory_stats(exe)["temp_size_in_bytes"]
        print(f"{clip}: {dict(kinds)}; fusions writing a 2048x2048 tensor: {full} ({full / len(specs):.0f} per "
              f"variable); all-reduce: {hlo.count('all-reduce(')}; temp {temp} B = {temp / state_bytes:.2e} of the "
              f"state's {state_bytes} B")


if __name__ == "__main__":
    main()
