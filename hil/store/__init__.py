"""A simulated store with ground truth (hil/store/sim.py), for scripts/bench_analytics.py and tests."""
