"""Error root of the config package: bad settings and contract violations."""


class ConfigError(Exception):
    """Root of every error raised by the config package."""


class SettingsError(ConfigError):
    """A setting has a bad value; the message names the setting."""


class ContractError(ConfigError):
    """Something does not follow the wire contract (ids, topics, payloads)."""


class InvalidId(ContractError):
    """An org or machine id does not match the id rule."""


class PayloadError(ContractError):
    """A payload was rejected; ``reason`` is a short stable code used for drop counters."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

