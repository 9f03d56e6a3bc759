"""The training loop (`train.py`) and its helpers: optimiser and schedule, the non-finite-loss
guard, the run log (metrics.jsonl, W&B), W&B resume, and the roll call of lost peers."""
