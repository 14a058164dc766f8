"""The reference worker: the agent loop and the runners for built-in task types."""

from nodepool.worker.agent import WorkerError, WorkerOptions, run_worker

__all__ = ["WorkerError", "WorkerOptions", "run_worker"]
