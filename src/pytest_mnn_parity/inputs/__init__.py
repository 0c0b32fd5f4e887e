"""What a model is fed: seeded inputs, real-data sources and named sets, sidecars, strategies, streams."""
