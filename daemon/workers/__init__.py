"""workers: the worker process and how a model is loaded and run."""
