"""The offline batch path: ``ringserve batch`` scores a CSV or Parquet table
with the daemon's own workers.

How a job runs (``job.py`` ties the steps together)::

    reader (columns.py, readers.py)        one process, the driver
      -> rows copied once into a ring slot (ipc/ring.py, shared memory)
      -> daemon.workers.child, one process per configured device, unchanged:
         the same Runner (load, dtype, compile, padding to a bucket)
      -> outputs read back from the slot, in input order
      -> part files + checkpoint (checkpoint.py, writers.py)
      -> distribution guardrails (guardrails.py)
      -> merged into a temporary file, renamed to its final name

Why the daemon's worker and not a second loop around ``Runner``: the worker
is the code that serves traffic, so a score computed offline is the score
the daemon would answer for the same batch, and a model that cannot be
served cannot be scored either. The driver speaks the worker's control
protocol (JSON lines: load, attach, stop) and its ring; no tensor is
pickled.

Exactly-once output: rows are written in input order to numbered part
files. Every checkpoint closes the current part, fsyncs it and then
atomically replaces ``checkpoint.json``, which lists the finished parts and
the input position just after their last row. A killed job resumes from
that position and deletes any part the checkpoint does not list, so each
input row appears in the output exactly once. Batches start at multiples of
the batch size from the start of the table, also after a resume, so a
resumed job computes every row in the same padded batch as an unbroken one
and its outputs are the same bits.
"""
