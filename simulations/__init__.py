"""Recipes that run fedlora end to end: the demo simulation and the benchmarks."""
