"""One self-contained HTML page of an output directory (an eval.out, a trace.out or an edit ledger): the
stage's tables, plots and records, for a browser, with nothing fetched from anywhere (``rome report DIR``)."""

from rome.pipeline.report.html import KINDS, REPORT_FILE, detect_kind, render_report, report_after_run, write_report

__all__ = ["KINDS", "REPORT_FILE", "detect_kind", "render_report", "report_after_run", "write_report"]
