"""`selfsup demo`: the whole pipeline on the embedded data (`command.py`), its steps (`steps.py`)
and `--compare`, every method under one budget (`compare.py`, `compare_plot.py`)."""
