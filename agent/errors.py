"""Error root of the agent package."""


class AgentError(Exception):
    """Root of every error raised by the agent package."""
