"""queue-worker: drains a multi-tenant PostgreSQL job queue into HTTP functions."""
