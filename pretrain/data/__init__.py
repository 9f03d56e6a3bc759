"""Data: sources (datasets.py), shard writing (shards.py) and streaming them into training (stream.py)."""
