"""The package's version, kept where every layer may read it (bundles and reports record it)."""
__version__ = "0.1.0"
