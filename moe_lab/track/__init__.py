"""Loggers: W&B and CSV behind one small interface; CSV and summary.json are the record of truth."""

from moe_lab.track.loggers import CSVSink, RunLogger, WandbSink, read_summary, write_json_atomic

__all__ = ["CSVSink", "RunLogger", "WandbSink", "read_summary", "write_json_atomic"]
