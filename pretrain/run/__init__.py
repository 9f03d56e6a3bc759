"""The run directory (`rundir.py`, its sole owner: layout, checkpoints, resolving a run) and what
leaves it: the export (`export.py`) and its torchvision/timm naming (`interop.py`)."""
