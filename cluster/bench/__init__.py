"""Serving benchmarks: an open-loop load generator for OpenAI-compatible servers.

`semipd bench serve` (cluster.commands.bench) drives `serve_bench.run_serve_bench`:
synthetic workloads with published length statistics (`workloads`), Poisson or gamma
arrivals (`arrivals`), streaming HTTP requests timed per chunk (`client`), structured outputs
and their correct rate (`structured`), vLLM-style aggregates and goodput (`metrics`), the result
record and its JSON (`result`), the printed text (`report`), the server's counters
(`server_metrics`), traffic over time (`traffic`), charts (`plot`) and sustained rates across a
sweep (`sweep`).
"""
