"""Fuzzy memberships and engine, regime classifier, MTF consensus, the DeepMamba forecaster."""
