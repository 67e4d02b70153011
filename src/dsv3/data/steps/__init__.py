"""The pipeline's document steps, each a small object whose `run` takes and yields documents and counts
what it drops and why: cleaning (clean.py), heuristic filters (filters.py, code.py), language id
(langid.py) and model-based quality filters (quality_models.py). pipeline_config.py names them for YAML."""
