"""Link state machines, driven without I/O: a client and a server wired back to back."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocol.envelope import Envelope, EnvelopeKind
from gateway.protocol.errors import ProtocolError
from gateway.protocol.link import (
    _CLIENT_RECV,
    _SERVER_RECV,
    Auth,
    AuthAccepted,
    AuthFail,
    AuthFailCode,
    AuthOk,
    AuthRejected,
    AuthRequested,
    Challenge,
    ChallengeReceived,
    ClientLink,
    Deliver,
    Delivered,
    DirectoryKind,
    Envelopes,
    EnvelopesReceived,
    Error,
    ErrorCode,
    FetchRequested,
    LinkError,
    LinkState,
    LinkUsageError,
    NotDelivered,
    Ping,
    Prekeys,
    PrekeysFetch,
    PrekeysPublish,
    PrekeysReceived,
    PrekeysStored,
    PrekeysStoredEvent,
    PublishRequested,
    Refresh,
    RefreshRequested,
    RemoteError,
    ServerLink,
    SpoofedSender,
    Undeliverable,
    UndeliverableReason,
    encode_frame,
)
from tests.relay.test_link_frames import FUZZ_EXAMPLES, frames


def pump(src: ClientLink | ServerLink, dst: ClientLink | ServerLink) -> None:
    for msg in src.data_to_send():
        dst.receive_data(msg)


def env(sender: str = "dev-a", recipient: str = "dev-b") -> Envelope:
    return Envelope(EnvelopeKind.PAIRWISE, os.urandom(16), sender, recipient, b"ct")


def connected() -> tuple[ClientLink, ServerLink]:
    client, server = ClientLink(), ServerLink()
    nonce = os.urandom(32)
    server.challenge(nonce, "relay.test")
    pump(server, client)
    assert client.events_received() == [ChallengeReceived(nonce, "relay.test", refresh=False)]
    client.authenticate("token-1")
    pump(client, server)
    assert server.events_received() == [AuthRequested("token-1", nonce, refresh=False)]
    server.accept("dev-a", 1000, 30)
    pump(server, client)
    assert client.events_received() == [AuthAccepted("dev-a", 1000, 30)]
    assert client.state is server.state is LinkState.READY
    return client, server


def test_handshake_and_envelopes_both_ways() -> None:
    client, server = connected()
    envs = [env(), env()]
    client.send_envelopes(envs)
    pump(client, server)
    assert server.events_received() == [EnvelopesReceived(tuple(envs))]
    incoming = [env("dev-c", "dev-a")]
    server.deliver(incoming)
    server.undeliverable(UndeliverableReason.OFFLINE, [envs[0].envelope_id])
    pump(server, client)
    assert client.events_received() == [
        Delivered(tuple(incoming)),
        NotDelivered(UndeliverableReason.OFFLINE, (envs[0].envelope_id,)),
    ]


def test_spoofed_sender_is_a_protocol_error() -> None:
    client, server = connected()
    client.send_envelopes([env(sender="dev-x")])
    with pytest.raises(SpoofedSender):
        pump(client, server)
    assert server.state is LinkState.CLOSED


@pytest.mark.parametrize("frame_maker", ["envelopes", "refresh", "ping"])
def test_nothing_but_auth_before_auth(frame_maker: str) -> None:
    """Garbage or data frames before AUTH close the link: a hand-made client skipping authentication."""
    _, server = ClientLink(), ServerLink()
    server.challenge(os.urandom(32), "relay.test")
    rogue = ClientLink()
    rogue.state = LinkState.READY  # pretend, to produce the frames
    {"envelopes": lambda: rogue.send_envelopes([env()]), "refresh": rogue.request_refresh, "ping": rogue.ping}[
        frame_maker
    ]()
    with pytest.raises(LinkError, match="unexpected"):
        pump(rogue, server)
    assert server.state is LinkState.CLOSED


def test_auth_fail_closes_client() -> None:
    client, server = ClientLink(), ServerLink()
    server.challenge(os.urandom(32), "relay.test")
    pump(server, client)
    client.authenticate("bad")
    pump(client, server)
    server.reject(AuthFailCode.REVOKED, "certificate 0x1f is revoked")
    pump(server, client)
    assert client.events_received()[-1] == AuthRejected(AuthFailCode.REVOKED, "certificate 0x1f is revoked")
    assert client.state is server.state is LinkState.CLOSED


def test_refresh_keeps_traffic_flowing() -> None:
    client, server = connected()
    client.request_refresh()
    client.send_envelopes([env()])  # data during refresh is fine
    pump(client, server)
    events = server.events_received()
    assert events[0] == RefreshRequested() and isinstance(events[1], EnvelopesReceived)
    nonce2 = os.urandom(32)
    server.challenge(nonce2, "relay.test")
    pump(server, client)
    assert client.events_received() == [ChallengeReceived(nonce2, "relay.test", refresh=True)]
    client.authenticate("token-2")
    pump(client, server)
    assert server.events_received() == [AuthRequested("token-2", nonce2, refresh=True)]
    with pytest.raises(LinkUsageError):
        server.accept("dev-other", 2000, 30)
    server.accept("dev-a", 2000, 30)
    pump(server, client)
    assert client.events_received() == [AuthAccepted("dev-a", 2000, 30)]
    assert server.expires_at == 2000 and client.state is LinkState.READY


def test_relay_initiated_challenge() -> None:
    client, server = connected()
    server.challenge(os.urandom(32), "relay.test")
    pump(server, client)
    ev = client.events_received()
    assert isinstance(ev[0], ChallengeReceived) and ev[0].refresh
    assert client.state is LinkState.REFRESH_CHALLENGED


def test_second_auth_without_challenge_rejected() -> None:
    _client, server = connected()
    rogue_auth = ClientLink()
    rogue_auth.state = LinkState.CHALLENGED
    rogue_auth.authenticate("again")
    with pytest.raises(LinkError):
        pump(rogue_auth, server)


def test_prekeys_publish_and_fetch() -> None:
    client, server = connected()
    rid = client.publish_prekeys(DirectoryKind.PREKEYS, b"bundle", [b"k1", b"k2"])
    fid = client.fetch_prekeys(DirectoryKind.PREKEYS, "dev-b")
    assert rid != fid
    pump(client, server)
    pub, fetch = server.events_received()
    assert pub == PublishRequested(rid, DirectoryKind.PREKEYS, b"bundle", (b"k1", b"k2"))
    assert fetch == FetchRequested(fid, DirectoryKind.PREKEYS, "dev-b")
    server.prekeys_stored(rid, 2)
    assert isinstance(fetch, FetchRequested)
    server.prekeys(fetch, b"b2", None)
    pump(server, client)
    assert client.events_received() == [
        PrekeysStoredEvent(rid, 2),
        PrekeysReceived(fid, DirectoryKind.PREKEYS, "dev-b", b"b2", None),
    ]


def test_error_frame_closes_and_reports() -> None:
    client, server = connected()
    server.fail(ErrorCode.REVOKED, "device certificate revoked")
    pump(server, client)
    assert client.events_received() == [RemoteError(ErrorCode.REVOKED, "device certificate revoked")]
    assert client.state is LinkState.CLOSED
    with pytest.raises(LinkUsageError):
        client.send_envelopes([env()])
    with pytest.raises(LinkError):
        client.receive_data(b"\x01\x06")


def test_usage_errors_are_not_protocol_errors() -> None:
    client = ClientLink()
    with pytest.raises(LinkUsageError):
        client.authenticate("too early")
    with pytest.raises(LinkUsageError):
        client.send_envelopes([env()])
    server = ServerLink()
    with pytest.raises(LinkUsageError):
        server.accept("dev-a", 1, 1)


@settings(max_examples=FUZZ_EXAMPLES)
@given(st.lists(frames, max_size=8), st.booleans())
def test_fuzz_frame_sequences(sequence: list, authenticate_first: bool) -> None:  # type: ignore[type-arg]
    """Any sequence of frames, allowed in the current state or not, raises only a ProtocolError."""
    client, server = (connected() if authenticate_first else (ClientLink(), ServerLink()))
    if not authenticate_first:
        server.challenge(os.urandom(32), "relay.test")
        pump(server, client)
    for link in (client, server):
        for frame in sequence:
            try:
                link.receive_data(encode_frame(frame))
            except ProtocolError:
                assert link.state is LinkState.CLOSED
                break
            link.events_received()


SAMPLE_FRAMES = {
    "Challenge": Challenge(bytes(32), "aud"),
    "Auth": Auth("tok"),
    "AuthOk": AuthOk("dev-a", 1, 1),
    "AuthFail": AuthFail(AuthFailCode.EXPIRED, "x"),
    "Refresh": Refresh(),
    "Ping": Ping(),
    "Envelopes": Envelopes((env(),)),
    "Deliver": Deliver((env("dev-c", "dev-a"),)),
    "Undeliverable": Undeliverable(UndeliverableReason.OFFLINE, (bytes(16),)),
    "PrekeysPublish": PrekeysPublish(1, DirectoryKind.PREKEYS, b"", ()),
    "PrekeysStored": PrekeysStored(1, 0),
    "PrekeysFetch": PrekeysFetch(1, DirectoryKind.PREKEYS, "dev-b"),
    "Prekeys": Prekeys(1, DirectoryKind.PREKEYS, "dev-b", None, None),
}


@pytest.mark.parametrize("side", ["client", "server"])
@pytest.mark.parametrize("state", [s for s in LinkState if s is not LinkState.CLOSED])
@pytest.mark.parametrize("name", sorted(SAMPLE_FRAMES))
def test_transition_table(side: str, state: LinkState, name: str) -> None:
    """Every (state, frame) pair: the table's next state, or a LinkError that closes the link."""
    link: ClientLink | ServerLink = ClientLink() if side == "client" else ServerLink()
    link.state = state
    if isinstance(link, ServerLink):
        link._auth.device_id = "dev-a"
    frame = SAMPLE_FRAMES[name]
    table = _CLIENT_RECV if side == "client" else _SERVER_RECV
    expected = table.get((state, type(frame)))
    if expected is None:
        with pytest.raises(LinkError):
            link.receive_data(encode_frame(frame))
        assert link.state is LinkState.CLOSED
    else:
        link.receive_data(encode_frame(frame))
        assert link.state is expected
        assert len(link.events_received()) == (0 if name == "Ping" else 1)


@pytest.mark.parametrize("side", ["client", "server"])
def test_error_frame_accepted_in_any_state(side: str) -> None:
    for state in LinkState:
        if state is LinkState.CLOSED:
            continue
        link: ClientLink | ServerLink = ClientLink() if side == "client" else ServerLink()
        link.state = state
        link.receive_data(encode_frame(Error(ErrorCode.SHUTDOWN, "bye")))
        assert link.state is LinkState.CLOSED
        assert link.events_received() == [RemoteError(ErrorCode.SHUTDOWN, "bye")]
