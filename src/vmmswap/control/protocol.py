"""The control protocol between the monitor and its clients (CLI, controller, device processes).

Transport: ``AF_UNIX`` ``SOCK_SEQPACKET``. The kernel keeps message boundaries, so one request
is one message and one response is one message: no length prefix, no partial reads, and file
descriptors (SCM_RIGHTS) travel attached to the message they belong to. A message is one JSON
object in UTF-8, at most :data:`MAX_MESSAGE` bytes; a longer one arrives truncated (MSG_TRUNC)
and is refused as oversized.

Everything here except :func:`send_message` / :func:`recv_message` is pure: bytes in, a validated
record or a :class:`ProtocolError` out. That is what the fuzz tests exercise, and why a malformed
message can never reach the state machine. The format is documented in docs/control-protocol.md.
"""

from __future__ import annotations

import array
import contextlib
import enum
import json
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from vmmswap.control.status import StatusFormatError, SwapStatus
from vmmswap.dataplane.guest_memory import RegionSpec

PROTOCOL_VERSION: Final = 1
#: Largest message either side accepts; requests are tiny, an init with 64 regions is ~4 KiB.
MAX_MESSAGE: Final = 64 * 1024
#: Most descriptors one message may carry: init sends uffd + swap file + the keeper socket +
#: staging + page state + one memfd per region + a uffd and a pidfd per device process (a
#: successor's init). SCM_RIGHTS carries at most 253 per message.
MAX_REGIONS: Final = 64
#: Device processes whose uffds a successor's init can carry.
MAX_INIT_DEVICES: Final = 90
MAX_FDS: Final = MAX_REGIONS + 5 + 2 * MAX_INIT_DEVICES
_FD_SIZE: Final = array.array("i").itemsize
_U64_MAX: Final = 2**64 - 1


class Command(enum.StrEnum):
    """Request names. The first five are crosvm's ``crosvm swap`` subcommands."""

    ENABLE = "enable"
    TRIM = "trim"
    OUT = "out"
    DISABLE = "disable"
    STATUS = "status"
    #: A device process hands over its own uffd (+ a pidfd of itself) and waits for the reply.
    REGISTER_PROCESS = "register_process"
    # Only accepted on the controller's private socketpair:
    INIT = "init"
    EXIT = "exit"
    #: The controller passes one end of a new socketpair that a device will use after fork.
    ATTACH = "attach"
    #: Stop serving and exit *without* swapping anything in: every page stays where it is
    #: (guest memory, staging, the swap file) in the descriptors the VMM keeps, for the VMM to
    #: read while it parks the VM (see control/controller_park.py). Only in a settled state.
    DETACH = "detach"


#: Commands a client of the public control socket may send.
PUBLIC_COMMANDS: Final = frozenset({Command.ENABLE, Command.TRIM, Command.OUT, Command.DISABLE,
                                    Command.STATUS, Command.REGISTER_PROCESS})
#: How many descriptors each command carries (exactly).
_FD_COUNT: Final[dict[Command, int]] = {Command.REGISTER_PROCESS: 2, Command.ATTACH: 1}


class ErrorKind(enum.StrEnum):
    """Why a request failed; lets a client tell its own mistake from the monitor's state."""

    #: Malformed, oversized or unknown request; nothing changed.
    REQUEST = "request"
    #: The command is not valid in the current swap state; nothing changed.
    STATE = "state"
    #: The peer is not allowed to talk to this monitor.
    PERMISSION = "permission"
    #: The command was valid but failed (e.g. freezing the VMM timed out, the move failed).
    FAILED = "failed"
    #: The monitor is shutting down or over a limit (too many clients or devices).
    BUSY = "busy"


class ProtocolError(ValueError):
    """A message that does not follow the protocol; ``kind`` goes into the error response."""

    def __init__(self, message: str, kind: ErrorKind = ErrorKind.REQUEST) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Request:
    """A validated request. ``slow_file_cleanup`` and ``drop_file`` (do not keep the swap
    file for dirty tracking) only mean something for ``disable``."""

    command: Command
    slow_file_cleanup: bool = False
    drop_file: bool = False


@dataclass(frozen=True, slots=True)
class ResumeInfo:
    """In a successor's init: how many monitors died before, and when the last one did
    (``time.monotonic()``, the same clock in every process)."""

    restarts: int
    died_at: float


@dataclass(frozen=True, slots=True)
class InitRequest:
    """The controller's first message: what the monitor serves.

    Descriptors, in order: the VMM's uffd, the swap file, the keeper socket (``keeper``: the
    monitor sends each device's uffd back on it, so the VMM holds them all), the control-area
    memfd (``control_area``: see :mod:`.restart_area`), the staging memfd
    and the page-state memfd (``restart_state``), one memfd per region, then a uffd and a
    pidfd for each of ``devices`` (pids; a successor's init only). ``resume`` is set for a
    successor: the descriptors are those its dead predecessor served.
    """

    regions: tuple[RegionSpec, ...]
    vmm_pid: int
    readahead: bool = True
    control_socket: str | None = None
    keeper: bool = False
    control_area: bool = False
    restart_state: bool = False
    devices: tuple[int, ...] = ()
    resume: ResumeInfo | None = None
    #: Track dirty pages across cycles (the uffds have the WP features; see
    #: vmmswap.dataplane.dirty), keeping at most ``keep_file_bytes`` of file (-1: no limit).
    dirty_tracking: bool = False
    keep_file_bytes: int = -1

    @property
    def fd_count(self) -> int:
        return (2 + self.keeper + self.control_area + 2 * self.restart_state + len(self.regions)
                + 2 * len(self.devices))


@dataclass(frozen=True, slots=True)
class InitFds:
    """An init's descriptors, by role (see :class:`InitRequest`)."""

    uffd: int
    swap: int
    keeper: int | None
    control: int | None
    staging: int | None
    state: int | None
    memfds: list[int]
    devices: list[tuple[int, int, int]]  # (pid, uffd, pidfd)

    @classmethod
    def split(cls, init: InitRequest, fds: Sequence[int]) -> InitFds:
        if len(fds) != init.fd_count:
            raise ProtocolError(f"init needs {init.fd_count} descriptors, got {len(fds)}")
        rest = list(fds)
        uffd, swap = rest.pop(0), rest.pop(0)
        keeper = rest.pop(0) if init.keeper else None
        control = rest.pop(0) if init.control_area else None
        staging = state = None
        if init.restart_state:
            staging, state = rest.pop(0), rest.pop(0)
        n = len(init.regions)
        memfds, rest = rest[:n], rest[n:]
        devices = [(pid, rest[2 * i], rest[2 * i + 1]) for i, pid in enumerate(init.devices)]
        return cls(uffd, swap, keeper, control, staging, state, memfds, devices)


@dataclass(frozen=True, slots=True)
class Response:
    """The answer to any request. ``status`` rides along whenever the monitor has one."""

    ok: bool
    message: str = ""
    error: ErrorKind | None = None
    status: SwapStatus | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def failure(cls, kind: ErrorKind, message: str, status: SwapStatus | None = None,
                ) -> Response:
        return cls(False, message, kind, status)


# --- encoding -----------------------------------------------------------------------------------
def _dump(value: dict[str, Any]) -> bytes:
    data = json.dumps(value, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    return data


def encode_request(request: Request) -> bytes:
    body: dict[str, Any] = {"version": PROTOCOL_VERSION, "command": str(request.command)}
    if request.command is Command.DISABLE:
        body["slow_file_cleanup"] = request.slow_file_cleanup
        if request.drop_file:
            body["drop_file"] = True
    return _dump(body)


def encode_init(init: InitRequest) -> bytes:
    body: dict[str, Any] = {
        "version": PROTOCOL_VERSION,
        "command": str(Command.INIT),
        "regions": [[r.guest_addr, r.host_addr, r.size] for r in init.regions],
        "vmm_pid": init.vmm_pid,
        "readahead": init.readahead,
        "control_socket": init.control_socket,
    }
    if init.keeper:
        body["keeper"] = True
    if init.control_area:
        body["control_area"] = True
    if init.restart_state:
        body["restart_state"] = True
    if init.devices:
        body["devices"] = list(init.devices)
    if init.resume is not None:
        body["resume"] = {"restarts": init.resume.restarts, "died_at": init.resume.died_at}
    if init.dirty_tracking:
        body["dirty_tracking"] = True
        body["keep_file_bytes"] = init.keep_file_bytes
    return _dump(body)


def encode_response(response: Response) -> bytes:
    body: dict[str, Any] = {
        "ok": response.ok,
        "message": response.message,
        "error": None if response.error is None else str(response.error),
        "status": None if response.status is None else response.status.to_dict(),
    }
    body.update(response.extra)
    return _dump(body)


# --- decoding -----------------------------------------------------------------------------------
def _parse_object(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE}-byte limit")
    if not data:
        raise ProtocolError("empty message")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("message is not UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:
        raise ProtocolError(f"message is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"message must be a JSON object, got {type(value).__name__}")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _check_keys(body: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise ProtocolError(f"unknown field(s) {extra}")


def _check_version(body: dict[str, Any]) -> None:
    version = body.get("version", PROTOCOL_VERSION)
    if isinstance(version, bool) or version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {version!r}; this monitor speaks "
                            f"{PROTOCOL_VERSION}")


def _command(body: dict[str, Any]) -> Command:
    name = body.get("command")
    if not isinstance(name, str):
        raise ProtocolError("field 'command' must be a string")
    try:
        return Command(name)
    except ValueError:
        raise ProtocolError(f"unknown command {name[:40]!r}; expected one of "
                            f"{sorted(str(c) for c in PUBLIC_COMMANDS)}") from None


def _bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"field {key!r} must be true or false")
    return value


def _uint(value: Any, what: str, limit: int = _U64_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise ProtocolError(f"{what} must be an integer in [0, {limit}]")
    return value


def decode_request(data: bytes, nfds: int = 0, *, public: bool = True) -> Request | InitRequest:
    """Validate one request message that arrived with ``nfds`` descriptors.

    ``public`` is True on the control socket, where only :data:`PUBLIC_COMMANDS` are allowed.
    Raises ProtocolError on anything else; the caller closes every received descriptor then.
    """
    body = _parse_object(data)
    _check_version(body)
    command = _command(body)
    if public and command not in PUBLIC_COMMANDS:
        raise ProtocolError(f"command {command!r} is only accepted from the VMM's controller",
                            ErrorKind.PERMISSION)
    if command is Command.INIT:
        init = _decode_init(body)
        if nfds != init.fd_count:
            raise ProtocolError(f"init needs {init.fd_count} descriptors, got {nfds}")
        return init
    expected_fds = _FD_COUNT.get(command, 0)
    if nfds != expected_fds:
        raise ProtocolError(f"{command} carries {expected_fds} descriptor(s), got {nfds}")
    if command is Command.DISABLE:
        _check_keys(body, {"version", "command", "slow_file_cleanup", "drop_file"})
        return Request(command, _bool(body, "slow_file_cleanup", False),
                       _bool(body, "drop_file", False))
    _check_keys(body, {"version", "command"})
    return Request(command)


def _decode_init(body: dict[str, Any]) -> InitRequest:
    _check_keys(body, {"version", "command", "regions", "vmm_pid", "readahead",
                       "control_socket", "keeper", "control_area", "restart_state", "devices",
                       "resume", "dirty_tracking", "keep_file_bytes"})
    regions = body.get("regions")
    if not isinstance(regions, list) or not 1 <= len(regions) <= MAX_REGIONS:
        raise ProtocolError(f"init: 'regions' must be a list of 1 to {MAX_REGIONS} regions")
    specs = []
    for i, region in enumerate(regions):
        if not isinstance(region, list) or len(region) != 3:
            raise ProtocolError(f"init: region {i} must be [guest_addr, host_addr, size]")
        g, h, s = (_uint(v, f"init: region {i}") for v in region)
        specs.append(RegionSpec(g, h, s))
    socket_path = body.get("control_socket")
    if socket_path is not None and (not isinstance(socket_path, str) or not socket_path
                                    or len(socket_path.encode()) > 107):
        raise ProtocolError("init: 'control_socket' must be null or a path of at most 107 "
                            "bytes")
    devices = body.get("devices", [])
    if not isinstance(devices, list) or len(devices) > MAX_INIT_DEVICES:
        raise ProtocolError(f"init: 'devices' must be a list of at most {MAX_INIT_DEVICES} "
                            "pids")
    pids = tuple(_uint(p, "init: device pid", 2**22) for p in devices)
    resume = None
    raw = body.get("resume")
    if raw is not None:
        if not isinstance(raw, dict) or set(raw) != {"restarts", "died_at"}:
            raise ProtocolError("init: 'resume' must be {restarts, died_at}")
        died_at = raw["died_at"]
        if isinstance(died_at, bool) or not isinstance(died_at, int | float) or not (
                0 <= died_at < 1e12):
            raise ProtocolError("init: resume.died_at must be a monotonic time in seconds")
        resume = ResumeInfo(_uint(raw["restarts"], "init: resume.restarts", 2**32 - 1),
                            float(died_at))
    return InitRequest(tuple(specs), _uint(body.get("vmm_pid"), "init: vmm_pid", 2**22),
                       _bool(body, "readahead", True), socket_path,
                       _bool(body, "keeper", False), _bool(body, "control_area", False),
                       _bool(body, "restart_state", False),
                       pids, resume, _bool(body, "dirty_tracking", False),
                       _keep_bytes(body.get("keep_file_bytes", -1)))


def _keep_bytes(value: Any) -> int:
    if value == -1 and not isinstance(value, bool):
        return -1
    return _uint(value, "init: keep_file_bytes")


def decode_response(data: bytes) -> Response:
    """Parse a monitor response; ProtocolError if it is not one."""
    body = _parse_object(data)
    ok = body.get("ok")
    message = body.get("message", "")
    if not isinstance(ok, bool) or not isinstance(message, str):
        raise ProtocolError("response needs a boolean 'ok' and a string 'message'")
    kind = body.get("error")
    error: ErrorKind | None = None
    if kind is not None:
        try:
            error = ErrorKind(kind)
        except ValueError:
            raise ProtocolError(f"response has an unknown error kind {kind!r}") from None
    raw_status = body.get("status")
    status = None
    if raw_status is not None:
        try:
            status = SwapStatus.from_dict(raw_status)
        except StatusFormatError as err:
            raise ProtocolError(f"response status: {err}") from None
    extra = {k: v for k, v in body.items() if k not in ("ok", "message", "error", "status")}
    return Response(ok, message, error, status, extra)


# --- transport ----------------------------------------------------------------------------------
def seqpacket_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of close-on-exec SOCK_SEQPACKET sockets."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send_message(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send one message, with ``fds`` attached (SCM_RIGHTS) when there are any."""
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sock.sendmsg([data], anc)
    else:
        sock.sendmsg([data])


@dataclass(slots=True)
class Received:
    """One received message. ``fds`` are owned by the receiver: use them or :meth:`close_fds`."""

    data: bytes
    fds: list[int]
    truncated: bool = False

    @property
    def eof(self) -> bool:
        return not self.data and not self.fds and not self.truncated

    def close_fds(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def recv_message(sock: socket.socket) -> Received:
    """Receive one message and its descriptors (close-on-exec).

    A zero-length result with no descriptors is end of file. ``truncated`` is set when the
    message or its descriptors did not fit; the caller must refuse it.
    """
    data, anc, flags, _ = sock.recvmsg(MAX_MESSAGE + 1, socket.CMSG_SPACE(MAX_FDS * _FD_SIZE),
                                       socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD_SIZE
            fds.extend(array.array("i", payload[:usable]))
    truncated = bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)) or len(data) > MAX_MESSAGE
    return Received(data, fds, truncated)


def request(sock: socket.socket, req: Request, fds: Sequence[int] = ()) -> Response:
    """Send ``req`` on a connected socket and wait for the response.

    Raises ConnectionError when the monitor closed the connection instead of answering. A
    monitor that refuses a connection (busy) answers before closing it: that answer is
    returned even when the send itself failed.
    """
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        send_message(sock, encode_request(req), fds)  # on failure a refusal may be waiting
    received = recv_message(sock)
    received.close_fds()
    if received.eof:
        raise ConnectionResetError("the vmm-swap monitor closed the connection without "
                                   "answering (it exited or was killed)")
    if received.truncated:
        raise ProtocolError("the monitor's response was too long")
    return decode_response(received.data)
