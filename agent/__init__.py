"""The fleet agent: psutil metrics and presence published over MQTT/TLS, with store-and-forward."""
