"""One check from model to verdict: the request, the engine and its sides, messages, bundles, search."""
