"""Embedded MQTT broker (amqtt, hardened): TLS, per-org credentials and access rules."""
