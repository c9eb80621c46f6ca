"""The entry point's wiring: settings from the environment, the invocation events, and the
`Worker` that holds what lives once per container and runs one invocation.

May import every package but `handler.local`; nothing but `handler.app` and `handler.local`
imports it.
"""
