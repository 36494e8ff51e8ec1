"""A webhook endpoint for the alert tests: the channel tests' HTTP recorder, read as signed notifications."""

from __future__ import annotations

from fleet.notify import verify
from tests.collector.http_recorder import Recorded, Recorder


def signed_with(post: Recorded, secret: str) -> bool:
    """True when the request's X-Fleet-Signature is the HMAC-SHA256 of its body under ``secret``."""
    headers = {k.lower(): v for k, v in post.headers.items()}
    return verify(secret, post.body, headers.get("x-fleet-signature"))


class Receiver(Recorder):
    """A started Recorder on a webhook path; ``answers`` scripts the first replies (e.g. 500, then 200)."""

    def __init__(self) -> None:
        super().__init__()
        self.start()

    @property
    def url(self) -> str:
        """The webhook URL to give the channel."""
        return f"{super().url}/hook"

    @property
    def posts(self) -> list[Recorded]:
        """The notifications accepted (answered 2xx)."""
        return [r for r in self.requests if r.status < 300]

    @property
    def attempts(self) -> int:
        """Every request, accepted or refused."""
        return len(self.requests)

    def wait_posts(self, n: int, timeout: float = 10.0) -> list[Recorded]:
        """Wait until ``n`` notifications were accepted; return them."""
        return self.wait_for_count(n, timeout, accepted=True)

    def wait_attempts(self, n: int, timeout: float = 10.0) -> list[Recorded]:
        """Wait until ``n`` requests arrived, answered or refused."""
        return self.wait_for_count(n, timeout)

    def alerts(self) -> list[tuple[str, str, str]]:
        """(status, alertname, machine_id) of every alert in every accepted notification, in order."""
        return [(a["status"], a["labels"]["alertname"], a["labels"]["machine_id"])
                for post in self.posts for a in post.json()["alerts"]]

    def close(self) -> None:
        """Stop serving."""
        self.stop()
