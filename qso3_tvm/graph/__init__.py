"""Molecules, neighbor lists, datasets, metrics and the artifact calling convention: numpy and scipy only."""
