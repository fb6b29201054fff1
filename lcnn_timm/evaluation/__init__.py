"""Evaluation: the [0, 1]-pixel model wrapper, metrics, results.json and the ``lcnn-timm evaluate`` CLI."""
from .datasets import EvalData, SyntheticDataset, load_eval_data
from .metrics import DEFAULT_METRICS, METRICS, MetricOptions, run_metric
from .model import NormalizedModel, create_eval_model, file_sha256, load_checkpoint_strict
from .results import SCHEMA_VERSION, load_results, new_results, write_results
