"""The collector: per-org subscriptions, live machine state, SQLite history."""
