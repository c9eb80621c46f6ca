"""Dispatch: which function a job goes to (routes), the HTTP call, what its answer means
(outcomes), and the idempotency guard around it.

May import `handler.queue` (for the claimed job's type) and `handler.operate.observability`.
"""
