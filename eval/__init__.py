"""Evaluation: benchmarks, harness, metrics and reports for vtc (installed as `vtc.eval`)."""
