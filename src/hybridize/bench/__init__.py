"""Benchmarks (`hybridize bench ...`): kernels vs mamba_ssm / fla / SDPA / the HBM floor (`ssd`, `step`),
decode throughput vs transformers' generate and the HBM floor (`decode`), synthetic-task sweeps
(`synthetic`). Each module has `main(argv)` and writes one JSON; `plots` turns the JSON into PNGs."""
