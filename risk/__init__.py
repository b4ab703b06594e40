"""Stage 3 risk management: the RiskManager gate (caps, sizing, kill switch, delta hedge)."""
from risk.risk_manager import Book, Proposal, RiskManager, Sizing

__all__ = ["Book", "Proposal", "RiskManager", "Sizing"]
