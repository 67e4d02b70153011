"""dsv3.data: raw documents to clean, deduplicated, tokenized training shards.

readers -> steps/ (clean, filters, code, langid, quality_models; the Step protocol is in document.py)
-> dedup -> writers; tokenizer and shards for training data; pipeline (with pipeline_config and
stages) runs it all from one YAML: `dsv3 preprocess --config configs/data/demo.yaml`.
"""
