"""Iron-condor construction: expiry choice, strikes by delta, wings, entry gates, exit rules."""
