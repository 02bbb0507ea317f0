"""Applications over the stages: evaluate, demo, molecular dynamics, benchmarks, report experiments."""
