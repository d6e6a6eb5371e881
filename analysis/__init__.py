"""Experiments as declarative run specs, a resumable runner, figures, tables and a claims ledger."""
