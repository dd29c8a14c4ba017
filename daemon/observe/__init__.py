"""observe: stats, figures, logs, the request log, feedback, drift."""
