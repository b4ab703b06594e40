"""Pure functions on arrays and frames: pricing, Greeks, implied volatility, surfaces, indicators."""
