"""The wire contract between the controller and instance processes (msgspec msgpack): the
records an engine step produces (request outputs, migration tickets and their completions)
and the tagged messages that carry them and the commands.

Nothing on these sockets is ever unpickled: every message is one of the tagged structs
below, signed with the deployment's secret (Sealer), and anything else is refused. It imports no torch: the controller and the HTTP
server use it.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any, Union

import msgspec

from distserve.request import SamplingParams


# ---- what engine steps report
@dataclass(frozen=True)
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0          # fraction of KV blocks in use, 0..1
    num_free_blocks: int = 0
    num_blocks: int = 0
    queued_tokens: int = 0         # prefill: prompt tokens waiting to run
    prefill_seconds_per_token: float = 0.0   # measured on recent prompt steps (0: none yet)


def predicted_ttft(queued_tokens: int, num_tokens: int, seconds_per_token: float) -> float | None:
    """Queueing plus prefill of a new prompt of `num_tokens` behind `queued_tokens`, at the
    measured prefill speed; None before any prompt was measured."""
    return (queued_tokens + num_tokens) * seconds_per_token if seconds_per_token > 0 else None


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None          # "stop" | "length" | "abort" | "error"
    new_logprobs: list[float] | None = None
    new_top_logprobs: list[dict[int, float]] | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    # timestamps (time.monotonic) for metrics
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class MigrationTicket:
    """What a decode instance needs to take a request over after its first token."""

    request_id: str
    prompt_token_ids: list[int]
    first_token_id: int
    first_text: str
    first_logprob: float | None
    block_ids: list[int]
    arrival_time: float
    first_token_time: float
    block_checksums: list[int] | None = None   # CRC-32 of each block's bytes (--kv-checksum)
    resumed_tokens: int = 0    # a re-run: the prompt's last tokens are earlier outputs (Resume)
    emitted_chars: int = 0     # output text streamed so far, the first token's included


@dataclass
class MigrationDone:
    request_id: str
    source: str
    nbytes: int
    seconds: float


# ---- controller -> instance
class Resume(msgspec.Struct, frozen=True):
    """A request run again after its instance died: the last `num_tokens` of its prompt are
    what it had generated, of whose text `emitted_chars` characters were streamed. The new
    run detokenises them as output, so stop strings see across the cut, text held back for a
    stop string is not lost, and a seeded request draws each token as it would have."""
    num_tokens: int
    emitted_chars: int


class AddRequest(msgspec.Struct, tag=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    resume: Resume | None = None


class AddMigration(msgspec.Struct, tag=True):
    ticket: MigrationTicket
    params: SamplingParams
    source: str                 # the prefill instance's id
    endpoint: dict[str, Any]    # how to reach its KV (the transfer backend's description)


class Release(msgspec.Struct, tag=True):
    request_id: str


class Abort(msgspec.Struct, tag=True):
    request_id: str


class Shutdown(msgspec.Struct, tag=True):
    pass


class SwitchRole(msgspec.Struct, tag=True):
    """Become a prefill or a decode instance, the model kept loaded: taken only by an
    instance started switchable and holding no request (the controller drains it first)."""
    role: str


# ---- instance -> controller
class Ready(msgspec.Struct, tag=True):
    instance_id: str
    role: str
    command_address: str
    num_kv_blocks: int
    block_size: int
    max_model_len: int
    vocab_size: int
    endpoint: dict[str, Any] | None = None  # prefill instances: where decode pulls KV from
    nonce: bytes = b""   # this incarnation's: the commands sent to it are bound to it (Sealer)


class Outputs(msgspec.Struct, tag=True):
    instance_id: str
    outputs: list[RequestOutput]


class Tickets(msgspec.Struct, tag=True):
    instance_id: str
    tickets: list[MigrationTicket]


class Migrated(msgspec.Struct, tag=True):
    instance_id: str
    done: list[MigrationDone]


class Rejected(msgspec.Struct, tag=True):
    instance_id: str
    request_id: str
    message: str


class StepSample(msgspec.Struct, array_like=True):
    """One engine iteration that ran one phase alone, as a latency profile prices it: how long
    it took, and its shape (a prefill step's chunk lengths; a decode step's batch, context sum
    and longest context). `serve --adapt` sets the measured speed against the profile."""
    seconds: float
    prefill_lens: list[int]
    decode_batch: int = 0
    decode_context_sum: int = 0
    decode_context_max: int = 0


class Stats(msgspec.Struct, tag=True):
    instance_id: str
    role: str
    num_running: int
    num_waiting: int
    queued_tokens: int
    kv_usage: float
    num_free_blocks: int
    num_blocks: int
    transfer_bytes: int = 0
    transfer_seconds: float = 0.0
    num_transfers: int = 0
    prefill_seconds_per_token: float = 0.0
    steps: list[StepSample] = []    # iterations since the last Stats (switchable instances)


class Failed(msgspec.Struct, tag=True):
    instance_id: str
    message: str


class Heartbeat(msgspec.Struct, tag=True):
    """Sent every HEARTBEAT_S from a thread of its own, model steps or not: an instance that
    stops sending (killed, stopped, wedged) is found within HEARTBEAT_TIMEOUT_S."""
    instance_id: str
    busy_s: float = 0.0   # how long the engine iteration in progress has run (0: between)


class RoleSwitched(msgspec.Struct, tag=True):
    """The answer to SwitchRole: the instance's role now, and (a prefill instance) where its KV
    is pulled from; `error` says why it kept its role."""
    instance_id: str
    role: str
    endpoint: dict[str, Any] | None = None
    error: str = ""


class PullFailed(msgspec.Struct, tag=True):
    """A decode instance could not pull a request's KV (its source died, a checksum failed):
    it computes the prompt itself (recomputed: the source's hold may go), or the request is
    dropped there, blocks freed, and the controller runs it again."""
    instance_id: str
    request_id: str
    message: str
    recomputed: bool = False


ToInstance = Union[AddRequest, AddMigration, Release, Abort, Shutdown, SwitchRole]
ToController = Union[Ready, Outputs, Tickets, Migrated, Rejected, Stats, Failed, Heartbeat,
                     PullFailed, RoleSwitched]
HEARTBEAT_S = 0.25
HEARTBEAT_TIMEOUT_S = 1.5

_encoder = msgspec.msgpack.Encoder()
_to_instance = msgspec.msgpack.Decoder(ToInstance)
_to_controller = msgspec.msgpack.Decoder(ToController)
TAG_BYTES = 32  # HMAC-SHA256
_SENDER_BYTES, _COUNTER_BYTES = 8, 8
SECRET_ENV = "DISTSERVE_DEPLOYMENT_SECRET"  # how a launcher hands an instance the secret


class BadFrame(ValueError):
    """A frame that is not an authentic message of this deployment: dropped, never fatal."""


class Sealer:
    """Signs and checks frames with the deployment's secret, so that a process outside the
    deployment can neither send a command nor forge an output, nor replay one it saw.

    A frame is HMAC-SHA256(secret, to + sender + counter + payload) + sender + counter +
    payload. `sender` is random per sending thread (one thread, one socket: ZeroMQ keeps each
    connection's order) and `counter` grows with every frame it sends, so a receiver takes
    each sender's frames only in increasing order: a replayed frame is refused. `to` binds a
    frame to one incarnation of its receiver (an instance's random nonce, sent in Ready), so
    commands captured before an instance restarted are refused by the new one."""

    MAX_SENDERS = 4096   # senders remembered (instances x restarts x threads), oldest forgotten

    def __init__(self, secret: bytes, nonce: bytes = b"") -> None:
        """nonce: what frames to this process must be bound to (an instance's incarnation)."""
        if len(secret) < 16:
            raise ValueError("a deployment secret has at least 16 bytes")
        self._secret = secret
        self.nonce = nonce
        self._local = threading.local()
        self._last: dict[bytes, int] = {}    # sender -> the highest counter taken from it

    @classmethod
    def new(cls) -> Sealer:
        return cls(secrets.token_bytes(32))

    @property
    def secret(self) -> bytes:
        return self._secret

    def seal(self, msg: msgspec.Struct, to: bytes = b"") -> bytes:
        """The signed frame of `msg` for the receiver whose nonce is `to`."""
        local = self._local
        if not hasattr(local, "sender"):
            local.sender, local.counter = secrets.token_bytes(_SENDER_BYTES), 0
        local.counter += 1
        head = local.sender + local.counter.to_bytes(_COUNTER_BYTES, "big")
        payload = _encoder.encode(msg)
        return self._tag(to, head, payload) + head + payload

    def open_for_instance(self, frame: bytes) -> ToInstance:
        return self._open(frame, _to_instance)

    def open_for_controller(self, frame: bytes) -> ToController:
        return self._open(frame, _to_controller)

    def _tag(self, to: bytes, head: bytes, payload: bytes) -> bytes:
        mac = hmac.new(self._secret, len(to).to_bytes(1, "big") + to, hashlib.sha256)
        mac.update(head)
        mac.update(payload)
        return mac.digest()

    def _open(self, frame: bytes, decoder):
        head_end = TAG_BYTES + _SENDER_BYTES + _COUNTER_BYTES
        tag, head, payload = frame[:TAG_BYTES], frame[TAG_BYTES:head_end], frame[head_end:]
        if len(frame) < head_end or not hmac.compare_digest(tag, self._tag(self.nonce, head,
                                                                            payload)):
            raise BadFrame(f"unauthenticated frame of {len(frame)} bytes")
        sender, counter = head[:_SENDER_BYTES], int.from_bytes(head[_SENDER_BYTES:], "big")
        if counter <= self._last.get(sender, 0):
            raise BadFrame(f"replayed frame of {len(frame)} bytes (number {counter} of its "
                           "sender, taken already)")
        self._last.pop(sender, None)
        self._last[sender] = counter
        if len(self._last) > self.MAX_SENDERS:
            del self._last[next(iter(self._last))]
        try:
            return decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:  # signed by a buggy peer
            raise BadFrame(f"undecodable frame of {len(frame)} bytes ({e})") from e
