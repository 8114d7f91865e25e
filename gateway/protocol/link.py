"""The relay link protocol, sans-I/O: frames and the client and server state machines.

One link frame is one WebSocket binary message: `version u8 (=1) | type u8 | body`. The exact bodies are in
docs/protocol.md ("Relay link"). Strings are length-prefixed UTF-8, integers big-endian, and every length is checked
against `LinkLimits` before anything is read, so a peer cannot make us allocate more than a frame's size.

The state machines follow websockets/h11: the I/O layer feeds each received message to `receive_data()`, the
application calls methods such as `send_envelopes()`, and the I/O layer then collects `events_received()` and
`data_to_send()` (a list of messages to send). Nothing here reads a clock or touches a socket; timeouts (auth,
idle, token refresh) belong to the shell. Bad input from the peer raises a `LinkError` (a `ProtocolError`);
misuse by the local application raises `LinkUsageError`, which is a bug, never the peer's fault.

Rules (the tables `_CLIENT_RECV`, `_SERVER_RECV` hold the transitions on received frames):
- The relay speaks first: CHALLENGE. The gateway answers AUTH; the relay answers AUTH_OK or AUTH_FAIL.
- Only after AUTH_OK do envelopes, prekey requests, REFRESH and PING flow; they keep flowing during a refresh.
- Refresh: the gateway sends REFRESH (or the relay sends an unsolicited CHALLENGE); CHALLENGE, AUTH, AUTH_OK
  follow on the live connection. A refresh must authenticate the same device.
- ERROR (either side) and AUTH_FAIL end the connection.
"""


from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

from gateway.protocol.envelope import Envelope, check_device_id
from gateway.protocol.link_frames import (
    LINK_VERSION,
    NONCE_SIZE,
    Auth,
    AuthFail,
    AuthFailCode,
    AuthOk,
    Challenge,
    Deliver,
    DirectoryKind,
    Envelopes,
    Error,
    ErrorCode,
    Frame,
    FrameError,
    GroupResult,
    GroupSend,
    GroupStatus,
    KeyPackageFetch,
    KeyPackagesPublish,
    LinkError,
    LinkLimits,
    LinkUsageError,
    Ping,
    Prekeys,
    PrekeysFetch,
    PrekeysPublish,
    PrekeysStored,
    Refresh,
    SpoofedSender,
    Undeliverable,
    UndeliverableReason,
    batch_envelopes,
    decode_frame,
    encode_frame,
)

__all__ = [
    "LINK_VERSION",
    "NONCE_SIZE",
    "Auth",
    "AuthFail",
    "AuthFailCode",
    "AuthOk",
    "Challenge",
    "Deliver",
    "DirectoryKind",
    "Envelopes",
    "Error",
    "ErrorCode",
    "Frame",
    "FrameError",
    "GroupResult",
    "GroupSend",
    "GroupStatus",
    "KeyPackageFetch",
    "KeyPackagesPublish",
    "LinkError",
    "LinkLimits",
    "LinkUsageError",
    "Ping",
    "Prekeys",
    "PrekeysFetch",
    "PrekeysPublish",
    "PrekeysStored",
    "Refresh",
    "SpoofedSender",
    "Undeliverable",
    "UndeliverableReason",
    "batch_envelopes",
    "decode_frame",
    "encode_frame",
]

# ---------------------------------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class ChallengeReceived:
    nonce: bytes
    audience: str
    refresh: bool


@dataclass(frozen=True, slots=True)
class AuthAccepted:
    device_id: str
    expires_at: int
    keepalive: int


@dataclass(frozen=True, slots=True)
class AuthRejected:
    code: AuthFailCode
    reason: str


@dataclass(frozen=True, slots=True)
class Delivered:
    envelopes: tuple[Envelope, ...]


@dataclass(frozen=True, slots=True)
class NotDelivered:
    reason: UndeliverableReason
    envelope_ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class PrekeysStoredEvent:
    request_id: int
    remaining: int


@dataclass(frozen=True, slots=True)
class PrekeysReceived:
    request_id: int
    kind: DirectoryKind
    device_id: str
    bundle: bytes | None
    one_time: bytes | None


@dataclass(frozen=True, slots=True)
class GroupResultReceived:
    request_id: int
    status: GroupStatus
    epoch: int
    undelivered: tuple[tuple[str, UndeliverableReason], ...]


@dataclass(frozen=True, slots=True)
class RemoteError:
    code: ErrorCode
    reason: str


@dataclass(frozen=True, slots=True)
class AuthRequested:
    token: str
    nonce: bytes
    refresh: bool


@dataclass(frozen=True, slots=True)
class EnvelopesReceived:
    envelopes: tuple[Envelope, ...]


@dataclass(frozen=True, slots=True)
class RefreshRequested:
    pass


@dataclass(frozen=True, slots=True)
class PublishRequested:
    request_id: int
    kind: DirectoryKind
    bundle: bytes
    one_time: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class FetchRequested:
    request_id: int
    kind: DirectoryKind
    device_id: str


@dataclass(frozen=True, slots=True)
class GroupSendRequested:
    request_id: int
    resend: bool
    envelope_id: bytes
    recipients: tuple[str, ...]
    message: bytes


@dataclass(frozen=True, slots=True)
class KeyPackagesPublishRequested:
    request_id: int
    agent: str
    last_resort: bytes
    key_packages: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class KeyPackageFetchRequested:
    request_id: int
    device_id: str
    agent: str


ClientEvent: TypeAlias = (
    ChallengeReceived | AuthAccepted | AuthRejected | Delivered | NotDelivered | PrekeysStoredEvent
    | PrekeysReceived | GroupResultReceived | RemoteError
)
ServerEvent: TypeAlias = (
    AuthRequested | EnvelopesReceived | RefreshRequested | PublishRequested | FetchRequested | GroupSendRequested
    | KeyPackagesPublishRequested | KeyPackageFetchRequested | RemoteError
)


# ---------------------------------------------------------------------------------------------------- states


class LinkState(enum.Enum):
    """Shared by both ends. REFRESH_* states are READY plus an authentication in progress."""

    START = "start"  # client: waiting for CHALLENGE; server: must send CHALLENGE
    CHALLENGED = "challenged"  # CHALLENGE sent/received, AUTH not yet
    AUTHENTICATING = "authenticating"  # AUTH sent/received, no verdict yet
    READY = "ready"
    REFRESH_REQUESTED = "refresh-requested"  # REFRESH sent/received, CHALLENGE not yet
    REFRESH_CHALLENGED = "refresh-challenged"
    REFRESH_AUTHENTICATING = "refresh-authenticating"
    CLOSED = "closed"


S = LinkState
_LIVE = (S.READY, S.REFRESH_REQUESTED, S.REFRESH_CHALLENGED, S.REFRESH_AUTHENTICATING)

# (state, received frame type) -> next state. Missing pairs are protocol errors; ERROR is accepted everywhere.
_CLIENT_RECV: dict[tuple[LinkState, type[Frame]], LinkState] = {
    (S.START, Challenge): S.CHALLENGED,
    (S.AUTHENTICATING, AuthOk): S.READY,
    (S.AUTHENTICATING, AuthFail): S.CLOSED,
    (S.READY, Challenge): S.REFRESH_CHALLENGED,
    (S.REFRESH_REQUESTED, Challenge): S.REFRESH_CHALLENGED,
    (S.REFRESH_AUTHENTICATING, AuthOk): S.READY,
    (S.REFRESH_AUTHENTICATING, AuthFail): S.CLOSED,
    **{(s, f): s for s in _LIVE for f in (Deliver, Undeliverable, PrekeysStored, Prekeys, GroupResult)},
}
_SERVER_RECV: dict[tuple[LinkState, type[Frame]], LinkState] = {
    (S.CHALLENGED, Auth): S.AUTHENTICATING,
    (S.READY, Refresh): S.REFRESH_REQUESTED,
    (S.REFRESH_CHALLENGED, Auth): S.REFRESH_AUTHENTICATING,
    **{(s, f): s for s in _LIVE for f in (Envelopes, PrekeysPublish, PrekeysFetch, Ping, GroupSend,
                                           KeyPackagesPublish, KeyPackageFetch)},
}


class _Link:
    """What both ends share: decoding, the transition table, and the outgoing/incoming queues."""

    _RECV: ClassVar[dict[tuple[LinkState, type[Frame]], LinkState]]

    def __init__(self, limits: LinkLimits | None = None) -> None:
        self.limits = limits or LinkLimits()
        self.state = LinkState.START
        self._out: list[bytes] = []
        self._events: list[object] = []
        self._said_goodbye = False  # an ERROR or AUTH_FAIL was queued, or the peer's ERROR received

    @property
    def pending_output(self) -> int:
        """Frames queued and not yet collected by `data_to_send()`: the shell stops reading when this grows."""
        return len(self._out)

    def data_to_send(self) -> list[bytes]:
        """Messages to write, in order; each is one WebSocket binary message."""
        out, self._out = self._out, []
        return out

    def _send(self, frame: Frame) -> None:
        if self.state is LinkState.CLOSED:
            raise LinkUsageError(f"cannot send {type(frame).__name__}: the link is closed")
        self._out.append(encode_frame(frame))

    def _expect(self, *states: LinkState) -> None:
        if self.state not in states:
            raise LinkUsageError(f"not allowed in state {self.state.value}")

    def _receive(self, data: bytes) -> Frame:
        if self.state is LinkState.CLOSED:
            raise LinkError("data received after the link closed")
        try:
            frame = decode_frame(data, self.limits)
        except LinkError:
            self.state = LinkState.CLOSED
            raise
        if isinstance(frame, Error):
            self.state = LinkState.CLOSED
            self._said_goodbye = True
            return frame
        nxt = self._RECV.get((self.state, type(frame)))
        if nxt is None:
            before, self.state = self.state, LinkState.CLOSED
            raise LinkError(f"unexpected {type(frame).__name__} frame in state {before.value}")
        self.state = nxt
        return frame

    def fail(self, code: ErrorCode, reason: str) -> None:
        """Queue an ERROR frame and close: the shell sends it, then closes the WebSocket. Also right after
        `receive_data()` raised, to tell the peer why; a no-op once an ERROR or AUTH_FAIL went out."""
        if not self._said_goodbye:
            self._out.append(encode_frame(Error(code, reason[: self.limits.max_text_size // 4])))
            self._said_goodbye = True
        self.state = LinkState.CLOSED


class ClientLink(_Link):
    """The gateway's end of a relay link."""

    _RECV = _CLIENT_RECV

    def __init__(self, limits: LinkLimits | None = None) -> None:
        super().__init__(limits)
        self._next_request = 1

    def events_received(self) -> list[ClientEvent]:
        events, self._events = self._events, []
        return events  # type: ignore[return-value]

    def receive_data(self, data: bytes) -> None:
        before = self.state
        frame = self._receive(data)
        ev: ClientEvent
        match frame:
            case Challenge(nonce, audience):
                ev = ChallengeReceived(nonce, audience, refresh=before is not S.START)
            case AuthOk(device_id, expires_at, keepalive):
                ev = AuthAccepted(device_id, expires_at, keepalive)
            case AuthFail(code, reason):
                ev = AuthRejected(code, reason)
            case Deliver(envelopes):
                ev = Delivered(envelopes)
            case Undeliverable(reason, ids):
                ev = NotDelivered(reason, ids)
            case PrekeysStored(request_id, remaining):
                ev = PrekeysStoredEvent(request_id, remaining)
            case Prekeys(request_id, kind, device_id, bundle, one_time):
                ev = PrekeysReceived(request_id, kind, device_id, bundle, one_time)
            case GroupResult(request_id, status, epoch, undelivered):
                ev = GroupResultReceived(request_id, status, epoch, undelivered)
            case Error(code, reason):
                ev = RemoteError(code, reason)
            case _:  # pragma: no cover - the table admits no other frame
                raise LinkError(f"unexpected {type(frame).__name__}")
        self._events.append(ev)

    def authenticate(self, token: str) -> None:
        """Answer the last CHALLENGE with a token bound to it."""
        self._expect(S.CHALLENGED, S.REFRESH_CHALLENGED)
        self._send(Auth(token))
        self.state = S.AUTHENTICATING if self.state is S.CHALLENGED else S.REFRESH_AUTHENTICATING

    def request_refresh(self) -> None:
        """Ask for a fresh challenge so a new token can replace the current one before it expires."""
        self._expect(S.READY)
        self._send(Refresh())
        self.state = S.REFRESH_REQUESTED

    def ping(self) -> None:
        self._expect(*_LIVE)
        self._send(Ping())

    def send_envelopes(self, envelopes: Sequence[Envelope]) -> None:
        """Queue envelopes in as few frames as the limits allow."""
        self._expect(*_LIVE)
        for batch in batch_envelopes(envelopes, self.limits):
            self._send(Envelopes(tuple(batch)))

    def publish_prekeys(self, kind: DirectoryKind, bundle: bytes, one_time: Sequence[bytes]) -> int:
        """Queue a publish; returns the request id that the PrekeysStoredEvent will carry."""
        self._expect(*_LIVE)
        if len(one_time) > self.limits.max_one_time:
            raise LinkUsageError(f"at most {self.limits.max_one_time} one-time prekeys per publish")
        request_id = self._request_id()
        self._send(PrekeysPublish(request_id, kind, bundle, tuple(one_time)))
        return request_id

    def fetch_prekeys(self, kind: DirectoryKind, device_id: str) -> int:
        self._expect(*_LIVE)
        request_id = self._request_id()
        self._send(PrekeysFetch(request_id, kind, check_device_id(device_id)))
        return request_id

    def group_send(self, recipients: Sequence[str], envelope_id: bytes, message: bytes, *, resend: bool = False
                   ) -> int:
        """Queue one MLS message for the relay to fan out to `recipients` (device ids); returns the request id
        that the GroupResultReceived will carry."""
        self._expect(*_LIVE)
        if not 1 <= len(recipients) <= self.limits.max_group_recipients:
            raise LinkUsageError(f"a group send names 1..{self.limits.max_group_recipients} devices")
        request_id = self._request_id()
        self._send(GroupSend(request_id, int(resend), envelope_id, tuple(check_device_id(d) for d in recipients),
                             message))
        return request_id

    def publish_key_packages(self, agent: str, last_resort: bytes, key_packages: Sequence[bytes]) -> int:
        self._expect(*_LIVE)
        if len(key_packages) > self.limits.max_one_time:
            raise LinkUsageError(f"at most {self.limits.max_one_time} KeyPackages per publish")
        request_id = self._request_id()
        self._send(KeyPackagesPublish(request_id, check_device_id(agent), last_resort, tuple(key_packages)))
        return request_id

    def fetch_key_package(self, device_id: str, agent: str) -> int:
        self._expect(*_LIVE)
        request_id = self._request_id()
        self._send(KeyPackageFetch(request_id, check_device_id(device_id), check_device_id(agent)))
        return request_id

    def _request_id(self) -> int:
        rid = self._next_request
        self._next_request = rid % 0xFFFFFFFF + 1
        return rid


@dataclass(slots=True)
class _ServerAuth:
    nonce: bytes = b""
    audience: str = ""
    device_id: str | None = None
    expires_at: int = 0
    keepalive: int = 0


class ServerLink(_Link):
    """The relay's end of one gateway's link. It enforces that envelopes carry the authenticated sender."""

    _RECV = _SERVER_RECV

    def __init__(self, limits: LinkLimits | None = None) -> None:
        super().__init__(limits)
        self._auth = _ServerAuth()

    @property
    def device_id(self) -> str | None:
        """The authenticated device, once AUTH_OK has been sent."""
        return self._auth.device_id

    @property
    def expires_at(self) -> int:
        return self._auth.expires_at

    def events_received(self) -> list[ServerEvent]:
        events, self._events = self._events, []
        return events  # type: ignore[return-value]

    def challenge(self, nonce: bytes, audience: str) -> None:
        """Send a fresh challenge: at the start, on REFRESH, or unprompted to ask for a new token."""
        self._expect(S.START, S.READY, S.REFRESH_REQUESTED)
        self._send(Challenge(nonce, audience))
        self._auth.nonce, self._auth.audience = nonce, audience
        self.state = S.CHALLENGED if self.state is S.START else S.REFRESH_CHALLENGED

    def receive_data(self, data: bytes) -> None:
        frame = self._receive(data)
        ev: ServerEvent | None
        match frame:
            case Auth(token):
                ev = AuthRequested(token, self._auth.nonce, refresh=self.state is S.REFRESH_AUTHENTICATING)
            case Envelopes(envelopes):
                for env in envelopes:
                    if env.sender != self._auth.device_id:
                        self.state = S.CLOSED
                        raise SpoofedSender(
                            f"envelope sender {env.sender!r} is not the authenticated device {self._auth.device_id!r}"
                        )
                ev = EnvelopesReceived(envelopes)
            case Refresh():
                ev = RefreshRequested()
            case Ping():
                ev = None
            case PrekeysPublish(request_id, kind, bundle, one_time):
                ev = PublishRequested(request_id, kind, bundle, one_time)
            case PrekeysFetch(request_id, kind, device_id):
                ev = FetchRequested(request_id, kind, device_id)
            case GroupSend(request_id, flags, envelope_id, recipients, message):
                ev = GroupSendRequested(request_id, bool(flags & 1), envelope_id, recipients, message)
            case KeyPackagesPublish(request_id, agent, last_resort, key_packages):
                ev = KeyPackagesPublishRequested(request_id, agent, last_resort, key_packages)
            case KeyPackageFetch(request_id, device_id, agent):
                ev = KeyPackageFetchRequested(request_id, device_id, agent)
            case Error(code, reason):
                ev = RemoteError(code, reason)
            case _:  # pragma: no cover - the table admits no other frame
                raise LinkError(f"unexpected {type(frame).__name__}")
        if ev is not None:
            self._events.append(ev)

    def accept(self, device_id: str, expires_at: int, keepalive: int) -> None:
        """The token checked out: send AUTH_OK. A refresh must name the device already authenticated."""
        self._expect(S.AUTHENTICATING, S.REFRESH_AUTHENTICATING)
        if self.state is S.REFRESH_AUTHENTICATING and device_id != self._auth.device_id:
            raise LinkUsageError("a refresh cannot change the authenticated device; reject it instead")
        self._send(AuthOk(check_device_id(device_id), expires_at, keepalive))
        self._auth.device_id, self._auth.expires_at, self._auth.keepalive = device_id, expires_at, keepalive
        self.state = S.READY

    def reject(self, code: AuthFailCode, reason: str) -> None:
        """The token failed: send AUTH_FAIL and close."""
        self._expect(S.AUTHENTICATING, S.REFRESH_AUTHENTICATING)
        self._send(AuthFail(code, reason[: self.limits.max_text_size // 4]))
        self.state = S.CLOSED
        self._said_goodbye = True

    def deliver(self, envelopes: Sequence[Envelope]) -> None:
        self._expect(*_LIVE)
        for batch in batch_envelopes(envelopes, self.limits):
            self._send(Deliver(tuple(batch)))

    def undeliverable(self, reason: UndeliverableReason, envelope_ids: Sequence[bytes]) -> None:
        self._expect(*_LIVE)
        ids = list(envelope_ids)
        step = self.limits.max_envelopes_per_frame
        for i in range(0, len(ids), step):
            self._send(Undeliverable(reason, tuple(ids[i : i + step])))

    def prekeys_stored(self, request_id: int, remaining: int) -> None:
        self._expect(*_LIVE)
        self._send(PrekeysStored(request_id, min(remaining, 0xFFFF)))

    def prekeys(self, request: FetchRequested, bundle: bytes | None, one_time: bytes | None) -> None:
        self._expect(*_LIVE)
        self._send(Prekeys(request.request_id, request.kind, request.device_id, bundle, one_time))

    def key_package(self, request: KeyPackageFetchRequested, last_resort: bytes | None, one_time: bytes | None
                    ) -> None:
        self._expect(*_LIVE)
        self._send(Prekeys(request.request_id, DirectoryKind.KEY_PACKAGES, request.device_id, last_resort, one_time))

    def group_result(self, request_id: int, status: GroupStatus, epoch: int,
                     undelivered: Sequence[tuple[str, UndeliverableReason]] = ()) -> None:
        self._expect(*_LIVE)
        self._send(GroupResult(request_id, status, epoch, tuple(undelivered)))
