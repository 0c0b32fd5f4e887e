"""Numbers and rules with no MNN in them: metrics, the first-pass compare, verdicts, tolerances, files."""
