"""Hooks the loop calls at fixed points (`base.py`: `TrainHook`, `HookContext`) and the end-of-run
pictures made through them (`pictures.py`, `recon.py`)."""
