"""The exactness table of docs/methods/dino.md: runs the 2-process workers of tests/test_dino.py and
tests/test_ibot_koleo.py under torchrun and prints every relative error (planted variants too).

    .venv/bin/python benchmarks/dino_exactness.py    # ~2 min on 2 busy cores
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_dino as td
import test_ibot_koleo as ti
import torch

out = {}
with tempfile.TemporaryDirectory() as d:
    for mod, name in ((td, "dino"), (ti, "ibot")):
        f = Path(d) / f"{name}.pt"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(Path(mod.__file__).resolve()), str(f)]
        p = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-2000:]
        out[name] = torch.load(f, weights_only=True)
whole = td._step("dino", slice(None), 1, ddp=False)
print("dino 1-proc accumulate=2", td._errors(td._step("dino", slice(None), 2, ddp=False), whole))
print("dino 1-proc per_micro acc2", td._errors(td._step("per_micro", slice(None), 2, ddp=False), whole))
for k, v in out["dino"].items():
    print("dino 2-proc", k, td._errors(v, whole))
ref = ti._step("ibot", slice(None), 1, ddp=False)
print("ibot 1-proc accumulate=2", ti._errors(ti._step("ibot", slice(None), 2, ddp=False), ref))
for k, v in out["ibot"].items():
    extra = ti.CASES[k][2]
    r = ti._step("ibot", slice(None), 1, ddp=False, extra=extra) if extra else ref
    print("ibot 2-proc", k, ti._errors(v, r))
extra = ti.CASES["koleo"][2]
halves = [ti._step("ibot", slice(r * 4, (r + 1) * 4), 1, ddp=False, extra=extra)["koleo"] for r in (0, 1)]
whole_k = ti._step("ibot", slice(None), 1, ddp=False, extra=extra)["koleo"]
got = out["ibot"]["koleo"]["koleo"]
print("koleo 2-proc", float(got), "mean per-rank", float((halves[0]+halves[1])/2), "global", float(whole_k),
      "rel vs mean", ti._rel(got, (halves[0]+halves[1])/2), "rel vs global", ti._rel(got, whole_k))
