"""Saving what a run computed, to compare later: output bundles and goldens."""
