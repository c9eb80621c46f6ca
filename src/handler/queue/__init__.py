"""The queue in PostgreSQL: the SQL (migrations), how to connect, and the typed calls.

Every SQL statement about jobs, schedules and history is sent from here. Imports nothing of
ours but `handler.errors` and `handler.frozen`.
"""
