"""Validation of the estimate against the trace on seeded random samples over every training flag
(sample.py: the table of choices and the draw; against_trace.py: the run, the CSV, the summary)."""
