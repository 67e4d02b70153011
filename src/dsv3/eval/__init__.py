"""Evaluation: benchmark data (data.py), task formats (tasks/), the model interface (lm.py) and its
backends (backends.py), scorers (scoring.py, metrics.py), the code sandbox (sandbox.py), the runner
behind `dsv3 eval` (runner.py), and an lm-evaluation-harness adapter (lm_eval_adapter.py)."""
