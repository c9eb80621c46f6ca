"""Local tools for a person at a terminal: the `queue-worker` command line, the demo, the
embedded PostgreSQL and the stand-in functions. Never shipped to Lambda.

May import everything; nothing outside this package imports it.
"""
