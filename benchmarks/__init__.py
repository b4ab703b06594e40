"""Scripts that print throughput and memory figures against a named anchor in the same run."""
