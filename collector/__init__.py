"""The collector: per-org subscriptions, live machine state, history, and alerting."""
