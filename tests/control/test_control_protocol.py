"""The control protocol's pure parts: encoding, validation, and property-based fuzzing."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmmswap.control.protocol import (
    MAX_MESSAGE,
    Command,
    ErrorKind,
    InitRequest,
    ProtocolError,
    Request,
    Response,
    decode_request,
    decode_response,
    encode_init,
    encode_request,
    encode_response,
    recv_message,
    send_message,
    seqpacket_pair,
)
from vmmswap.control.status import SwapState, SwapStatus
from vmmswap.dataplane.guest_memory import RegionSpec


@pytest.mark.parametrize("command", [Command.ENABLE, Command.TRIM, Command.OUT,
                                     Command.STATUS])
def test_round_trip(command: Command) -> None:
    assert decode_request(encode_request(Request(command))) == Request(command)


def test_disable_flag_round_trips() -> None:
    req = Request(Command.DISABLE, slow_file_cleanup=True)
    assert decode_request(encode_request(req)) == req
    assert decode_request(b'{"command":"disable"}') == Request(Command.DISABLE, False)


def test_init_round_trip_and_is_private() -> None:
    init = InitRequest((RegionSpec(0, 0x7F0000000000, 0x200000),), 123, False, "/tmp/s")
    data = encode_init(init)
    assert decode_request(data, 3, public=False) == init
    with pytest.raises(ProtocolError) as info:
        decode_request(data, 3, public=True)
    assert info.value.kind is ErrorKind.PERMISSION
    with pytest.raises(ProtocolError, match="descriptors"):
        decode_request(data, 2, public=False)


@pytest.mark.parametrize("data", [
    b"", b"{", b"[]", b'"enable"', b"\xff\xfe", b'{"command":"enable","x":1}',
    b'{"command":"Enable"}', b'{"command":1}', b'{"command":"exit"}', b'{"command":"init"}',
    b'{"command":"disable","slow_file_cleanup":1}', b'{"command":"status","version":2}',
    b'{"command":"status","version":true}', b'{"command":"status","version":NaN}',
    b"[" * 100000, b'{"command":"register_process"}',
])
def test_malformed_requests_are_refused(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_request(data)


def test_descriptor_counts_are_checked() -> None:
    with pytest.raises(ProtocolError, match="descriptor"):
        decode_request(b'{"command":"status"}', 1)
    assert decode_request(b'{"command":"register_process"}', 2) == Request(
        Command.REGISTER_PROCESS)


def test_oversized_is_refused() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_request(b" " * (MAX_MESSAGE + 1))


def test_response_round_trip() -> None:
    status = SwapStatus(SwapState.FAILED, error="disk full")
    resp = Response.failure(ErrorKind.FAILED, "swap out failed", status)
    back = decode_response(encode_response(resp))
    assert back.ok is False and back.error is ErrorKind.FAILED and back.status == status


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_crash(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_request(data, 0)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["command", "version", "slow_file_cleanup", "regions",
                                        "vmm_pid", "x"]),
                       _json | st.sampled_from([c.value for c in Command]), max_size=5),
       st.integers(0, 3), st.booleans())
def test_random_objects_either_validate_or_raise(body: dict[str, object], nfds: int,
                                                 public: bool) -> None:
    data = json.dumps(body).encode()
    try:
        req = decode_request(data, nfds, public=public)
    except ProtocolError:
        return
    assert isinstance(req, Request | InitRequest)


def test_transport_carries_descriptors() -> None:
    a, b = seqpacket_pair()
    r, w = os.pipe()
    try:
        send_message(a, b"hello", [r])
        got = recv_message(b)
        assert got.data == b"hello" and len(got.fds) == 1 and not got.truncated
        os.write(w, b"x")
        assert os.read(got.fds[0], 1) == b"x"
        got.close_fds()
        a.sendmsg([b"y" * (MAX_MESSAGE + 10)])
        assert recv_message(b).truncated
        a.close()
        assert recv_message(b).eof
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()
