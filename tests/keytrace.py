"""The test hook of tests/test_elastic_runs.py: runs the ``selfsup`` CLI with every batch the
trainer draws written down, so the test can count which sample keys were trained on.

``KEYTRACE_DIR=<dir> python tests/keytrace.py pretrain ...``: each rank appends to
``<dir>/rank-<r>.jsonl`` one line per micro-batch: the step it belongs to (steps done + 1), the
epoch and its keys. Nothing of the trainer is replaced: its own iterator is wrapped on the way out."""

from __future__ import annotations

import json
import os
import sys

from selfsup.pretrain.loop import train as train_module

_orig = train_module.Trainer.epoch_batches


def _traced(self):
    path = os.path.join(os.environ["KEYTRACE_DIR"], f"rank-{self.accelerator.process_index}.jsonl")
    with open(path, "a") as f:
        for batch in _orig(self):
            f.write(json.dumps({"step": self.pos.step + 1, "epoch": self.pos.epoch, "keys": batch["keys"]}) + "\n")
            f.flush()
            yield batch


train_module.Trainer.epoch_batches = _traced

if __name__ == "__main__":
    from selfsup.launch.cli.main import main

    sys.exit(main(sys.argv[1:]))
