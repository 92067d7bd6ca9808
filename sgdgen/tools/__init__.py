"""Command-line tools: `sgdgen` (emit, compile, inspect, demo, bench) and `sgdgen-opt`."""
