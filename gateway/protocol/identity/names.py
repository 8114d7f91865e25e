"""SPIFFE names for devices and agents.

A device is `spiffe://<fleet>/device/<device-id>`; an agent is `spiffe://<fleet>/device/<device-id>/agent/<name>`,
written `<device-id>/<name>` in short. Ids are restricted to a conservative alphabet so that they are safe in
MQTT topics, file names and log lines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.protocol.identity.errors import BadName

_ID = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$")
_FLEET = re.compile(r"^[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?$")


def check_id(kind: str, value: str) -> str:
    """Validate a device id or agent name: 1-64 chars of a-z 0-9 . _ -, starting and ending alphanumeric."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise BadName(f"{kind} {value!r} must be 1-64 characters of a-z, 0-9, '.', '_', '-', "
                      "starting and ending with a letter or digit")
    return value


def check_fleet(value: str) -> str:
    if not isinstance(value, str) or not _FLEET.fullmatch(value):
        raise BadName(f"fleet {value!r} must be a DNS-like name of a-z, 0-9, '.', '-'")
    return value


@dataclass(frozen=True, slots=True)
class DeviceName:
    fleet: str
    device_id: str

    def __post_init__(self) -> None:
        check_fleet(self.fleet)
        check_id("device id", self.device_id)

    @property
    def uri(self) -> str:
        return f"spiffe://{self.fleet}/device/{self.device_id}"

    def agent(self, name: str) -> AgentName:
        return AgentName(self.fleet, self.device_id, name)

    @classmethod
    def parse(cls, uri: str) -> DeviceName:
        parts = _split(uri)
        if len(parts) != 3 or parts[1] != "device":
            raise BadName(f"{uri!r} is not a device id of the form spiffe://<fleet>/device/<id>")
        return cls(parts[0], parts[2])


@dataclass(frozen=True, slots=True)
class AgentName:
    fleet: str
    device_id: str
    name: str

    def __post_init__(self) -> None:
        check_fleet(self.fleet)
        check_id("device id", self.device_id)
        check_id("agent name", self.name)

    @property
    def uri(self) -> str:
        return f"spiffe://{self.fleet}/device/{self.device_id}/agent/{self.name}"

    @property
    def short(self) -> str:
        return f"{self.device_id}/{self.name}"

    @property
    def device(self) -> DeviceName:
        return DeviceName(self.fleet, self.device_id)

    @classmethod
    def parse(cls, uri: str) -> AgentName:
        parts = _split(uri)
        if len(parts) != 5 or parts[1] != "device" or parts[3] != "agent":
            raise BadName(f"{uri!r} is not an agent id of the form spiffe://<fleet>/device/<id>/agent/<name>")
        return cls(parts[0], parts[2], parts[4])

    @classmethod
    def parse_short(cls, fleet: str, short: str) -> AgentName:
        device_id, sep, name = short.partition("/")
        if not sep:
            raise BadName(f"{short!r} is not an agent of the form <device-id>/<name>")
        return cls(fleet, device_id, name)


def _split(uri: str) -> list[str]:
    if not isinstance(uri, str) or not uri.startswith("spiffe://"):
        raise BadName(f"{uri!r} is not a spiffe:// URI")
    return uri[len("spiffe://"):].split("/")
