"""The batch: the invocation's time budget, the claim and its dispatch lanes, settlement.

Plain Python, no Lambda in here. May import `handler.dispatch`, `handler.queue` and
`handler.operate.observability`.
"""
