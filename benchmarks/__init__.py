"""Benchmark harness for torchloss_fused: ``python -m benchmarks.run --help``.

One job per module: cases (what is swept), problems (inputs of each op), oracle (fp64
reference results), baselines (the implementations compared), correctness (the check run
before timing), timing, memory, bytes_model, device_info, runner (one case end to end),
report (table/markdown), results_json (the versioned JSON schema), plot, run (the CLI);
scaled_loss times a scaled loss with and without the upstream guess, and precision
measures float32 accuracy against F.cross_entropy's (neither is a benchmark row).
"""
