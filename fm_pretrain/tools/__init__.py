"""Command-line tools that work on run directories (offline: no training ranks needed)."""
