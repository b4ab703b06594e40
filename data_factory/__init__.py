"""Loaders into the canonical frames: embedded daily data, intraday synthesis, option-chain synthesis."""
