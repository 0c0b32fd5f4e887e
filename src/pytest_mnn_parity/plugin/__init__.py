"""The pytest layer: hooks (the entry point), the run state, options, items, and users' fixtures."""
