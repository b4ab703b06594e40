"""CLI, configuration, value objects, the trading engine, drivers, portfolio and execution."""
