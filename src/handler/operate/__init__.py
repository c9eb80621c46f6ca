"""Operation: recurring schedules, maintenance (pruning), fan-out, observability.

`observability` imports nothing of ours but `handler.errors`, so every package may use it; the others may import
`handler.queue`.
"""
