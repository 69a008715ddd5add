"""Speed and memory: the benchmark, its worker processes and contenders, and the focused benches."""
