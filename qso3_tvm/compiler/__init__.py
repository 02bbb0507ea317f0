"""From a model to a library: export, Relax import, kernels and schedules, targets, tuning, build."""
