"""The MQTT topic scheme between local agents and the gateway (documented in docs/protocol.md, "MQTT").

    agw/<agent>/out/<peer-device>/<peer-agent>             an agent sends to a peer agent
    agw/<agent>/out/<peer-device>/<peer-agent>/r/<topic>   a reply, to be delivered at the peer on <topic>
    agw/<agent>/in                                         the agent receives here
    agw/<agent>/...                                        the agent's own namespace (e.g. reply topics)
    agw/<agent>/receipt                                    the gateway: SDK message ids it has durably (receipts)
    agw/<agent>/ack                                        the SDK: message ids it handed to the application

Agents may only write under agw/<agent>/out/ (and agw/<agent>/ack, group topics) and read under agw/<agent>/
(firmware-config ACL template).
Messages delivered to an agent carry the user properties `agw:from` (<device>/<agent>) and `agw:message-id`.
A request's response topic is rewritten for the recipient to the reply form above, so that the reply travels
back end to end and arrives on the requester's own response topic.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from gateway.protocol.identity.errors import BadName
from gateway.protocol.identity.names import check_id

RESERVED_PREFIX = "agw:"
PROP_FROM = "agw:from"
PROP_MESSAGE_ID = "agw:message-id"
# The SDK's own id for a message it sends (gateway/receipts.py). Not agw:message-id: every delivered message carries
# that one, and a raw client that forwards a message with its properties must not have its copies taken for
# retransmissions of one message.
PROP_SDK_ID = "agw:sdk-id"
PROP_DELIVER_TO = "agw:deliver-to"
# On a receipt: the SDK ids it names were refused for good at ingest, for this reason (gateway/receipts.py).
PROP_REFUSED = "agw:refused"
# On an agent's announcement (its empty ack): the groups whose messages this SDK client reads and acknowledges,
# comma-separated (gateway/groups_held.py). Absent: none (an SDK that predates it, or one that reads no group).
PROP_GROUPS = "agw:groups"
# On an agent's announcement and goodbye: the SDK client's instance id, 32 lowercase hex digits (random, one per
# client object): the gateway holds the agent's messages while any client it announced has not said goodbye.
PROP_INSTANCE = "agw:instance"


class TopicError(ValueError):
    """A topic does not follow the scheme."""


@dataclass(frozen=True, slots=True)
class OutTopic:
    agent: str
    peer_device: str
    peer_agent: str
    deliver_to: str | None


CACHED_TOPIC_MAX = 256  # longer topics (agent-chosen reply paths) are parsed each time, never held by the cache


def parse_out_topic(prefix: str, topic: str) -> OutTopic:
    """The parts of an agent's outbound topic; raises TopicError. Memoised for topics of up to CACHED_TOPIC_MAX
    characters (a topic recurs on every message of an agent to a peer, and the result is immutable; errors are not
    cached); a local agent's long topics cannot make the cache hold megabytes."""
    if len(topic) > CACHED_TOPIC_MAX:
        return _parse_out_topic(prefix, topic)
    return _parse_out_topic_cached(prefix, topic)


def _parse_out_topic(prefix: str, topic: str) -> OutTopic:
    parts = topic.split("/")
    if len(parts) < 5 or parts[0] != prefix or parts[2] != "out":
        raise TopicError(f"{topic!r} is not {prefix}/<agent>/out/<peer-device>/<peer-agent>")
    try:
        agent, device, peer = check_id("agent", parts[1]), check_id("device", parts[3]), check_id("agent", parts[4])
    except BadName as exc:
        raise TopicError(str(exc)) from None
    deliver_to = None
    if len(parts) > 5:
        if parts[5] != "r" or len(parts) < 7:
            raise TopicError(f"{topic!r}: after the peer agent only r/<reply-topic> may follow")
        deliver_to = "/".join(parts[6:])
    return OutTopic(agent, device, peer, deliver_to)


_parse_out_topic_cached = functools.lru_cache(maxsize=1024)(_parse_out_topic)


def out_subscription(prefix: str) -> str:
    return f"{prefix}/+/out/#"


def ack_subscription(prefix: str) -> str:
    return f"{prefix}/+/ack"


def gateway_subscriptions(prefix: str) -> list[str]:
    """Everything the gateway subscribes to on its broker (QoS 1)."""
    return [out_subscription(prefix), *group_subscriptions(prefix), ack_subscription(prefix)]


def ack_topic(prefix: str, agent: str) -> str:
    return f"{prefix}/{agent}/ack"


def receipt_topic(prefix: str, agent: str) -> str:
    return f"{prefix}/{agent}/receipt"


def ack_agent(prefix: str, topic: str) -> str | None:
    """The agent of an ack topic agw/<agent>/ack, else None."""
    if not topic.endswith("/ack"):  # (every message of an agent asks: most are not acks)
        return None
    parts = topic.split("/")
    if len(parts) == 3 and parts[0] == prefix and parts[2] == "ack":
        try:
            return check_id("agent", parts[1])
        except BadName:
            return None
    return None


def inbox_topic(prefix: str, agent: str) -> str:
    return f"{prefix}/{agent}/in"


def reply_topic(prefix: str, agent: str, peer_device: str, peer_agent: str, response_topic: str) -> str:
    """The response topic shown to `agent` for a request from `peer_device/peer_agent`."""
    return f"{prefix}/{agent}/out/{peer_device}/{peer_agent}/r/{response_topic}"


def agent_may_receive_on(prefix: str, agent: str, topic: str) -> bool:
    """A deliver-to topic must stay inside the recipient's own namespace and not be an out topic."""
    head = f"{prefix}/{agent}/"
    return topic.startswith(head) and not topic.startswith(head + "out/") and "+" not in topic and \
        "#" not in topic and len(topic) <= 1024


def group_subscriptions(prefix: str) -> list[str]:
    """agw/<agent>/group/<group>/out (messages to the group) and .../ctl (create, add, remove)."""
    return [f"{prefix}/+/group/+/out", f"{prefix}/+/group/+/ctl"]


def is_group_topic(prefix: str, topic: str) -> bool:
    if "/group/" not in topic:  # (every message of an agent asks: most are not group messages)
        return False
    parts = topic.split("/")
    return len(parts) == 5 and parts[0] == prefix and parts[2] == "group" and parts[4] in ("out", "ctl")


def group_inbox_topic(prefix: str, agent: str, group: str) -> str:
    return f"{prefix}/{agent}/group/{group}/in"
