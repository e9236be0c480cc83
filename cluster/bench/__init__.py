"""Serving benchmarks: an open-loop load generator for OpenAI-compatible servers.

`semipd bench serve` (cluster.commands.bench) drives `serve_bench.run_serve_bench`:
synthetic workloads with published length statistics (`workloads`), Poisson or gamma
arrivals (`arrivals`), streaming HTTP requests timed per chunk (`client`), vLLM-style
aggregates and goodput (`metrics`), and the printed block, JSON and plots (`report`).
"""
