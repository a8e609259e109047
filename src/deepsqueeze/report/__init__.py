"""Self-contained HTML reports (plotly figures inlined, no network) for a search study or a .dsq artifact."""

from deepsqueeze.report.artifact import artifact_report, layer_bytes, layer_output_errors
from deepsqueeze.report.study import load_study, study_report

__all__ = ["artifact_report", "layer_bytes", "layer_output_errors", "load_study", "study_report"]
