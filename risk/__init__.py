"""RiskManager: portfolio Greeks, caps, drawdown kill switch, risk-budget sizing."""
