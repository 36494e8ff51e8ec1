"""The `fleet` command: wires the parts together; holds no logic of its own."""
