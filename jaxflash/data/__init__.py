"""Data: tokenization, prepared token shards, and the Grain loader."""
