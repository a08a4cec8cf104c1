"""Evaluation of generated calorimeter showers against a reference (CaloChallenge 2022 metrics).

``evaluate(sample, reference, EvalConfig()) -> EvalReport``; ``evaluate_model(model, reference, n, config)``;
``EvalReport.metrics`` is a flat ``dict[str, float]`` and ``EvalReport.write(out_dir)`` writes report.json,
report.md and PNG plots. See docs/evaluation.md.
"""

from caloforge.evaluation.api import evaluate, evaluate_model, generate_sample
from caloforge.evaluation.config import (
    ClassifierConfig,
    EvalConfig,
    FPDConfig,
    GroupClassifierConfig,
    GroupConfig,
    KPDConfig,
    PlotConfig,
    PRDCConfig,
)
from caloforge.evaluation.mlflow_hook import log_report_to_mlflow
from caloforge.evaluation.report import EvalReport

__all__ = [
    "ClassifierConfig",
    "EvalConfig",
    "EvalReport",
    "FPDConfig",
    "GroupClassifierConfig",
    "GroupConfig",
    "KPDConfig",
    "PRDCConfig",
    "PlotConfig",
    "evaluate",
    "evaluate_model",
    "generate_sample",
    "log_report_to_mlflow",
]
