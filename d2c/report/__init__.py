"""The HTML report of d2c runs (``d2c report``): Ray-free, it reads the run directories' files."""

from d2c.report.page import run_report, write_report

__all__ = ["run_report", "write_report"]
