"""Alerting in the collector: rule evaluation, grouping, the outbox's delivery and the notification channels."""
