"""amqtt plugins (loaded by dotted path) that put AccessPolicy in front of amqtt's auth and topic checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from fleet.broker.policy import AccessPolicy, Verdict
from fleet.broker.sessions import extras, grant_of

# The broker registers its policy here before amqtt instantiates the plugins (they get no other handle).
POLICIES: dict[str, AccessPolicy] = {}


class FleetAuthPlugin(BaseAuthPlugin):
    """Authenticates CONNECTs with the org keys (anonymous and unknown users refused)."""

    @dataclass
    class Config:
        """Which registered AccessPolicy to use."""

        policy: str = "default"

    async def authenticate(self, *, session: Session) -> bool | None:
        """True only for a valid key whose client id and will satisfy the access rules."""
        policy = POLICIES.get(self.context.config.policy)
        if policy is None:  # a CONNECT racing the broker's shutdown, after its policy was unregistered
            return False
        will_topic = session.will_topic if session.will_flag else None
        def check() -> Verdict:
            return policy.check_connect(session.username, session.password, session.client_id or "", will_topic,
                                        session.will_message, bool(session.will_retain), extras(session).peer)

        verdict = check()
        if verdict.unknown and policy.refresh is not None:
            await policy.refresh()
            verdict = check()
        if verdict.grant is not None:
            extras(session).grant = verdict.grant
        return verdict.grant is not None


class FleetTopicPlugin(BaseTopicPlugin):
    """Applies the publish, subscribe and receive rules (docs/protocol.md) to amqtt's topic checks."""

    @dataclass
    class Config:
        """Which registered AccessPolicy to use."""

        policy: str = "default"

    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: Action | None = None, **_: Any) -> bool:
        """Allow only what the session's grant permits; no grant, nothing."""
        grant = grant_of(session)
        if grant is None or topic is None:
            return False
        if action == Action.SUBSCRIBE:
            return AccessPolicy.may_subscribe(grant, topic)
        if action == Action.RECEIVE:
            return AccessPolicy.may_receive(grant, topic)
        if action == Action.PUBLISH:
            return AccessPolicy.may_publish(grant, topic, b"", retain=False)
        return False
