"""Settings and the wire contract (ids, topics, payloads, database schema) shared by every part."""
