"""Settings and the wire contract (ids, topics, payloads, alert rules) shared by every part."""
