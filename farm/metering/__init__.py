"""Prices, cost arithmetic and the ledger rules."""
