"""Evaluation of checkpoints: which models (checkpoint.py), batched cached generation (generation.py), the
GSM8K / GSM-hard job (math.py) and the bridge to lm-evaluation-harness (lm_eval_bridge.py)."""
