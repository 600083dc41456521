"""Typed control messages between the controller and instance processes (msgspec msgpack).

Nothing on these sockets is ever unpickled: every message is one of the tagged structs
below, and decoding anything else fails.
"""
from __future__ import annotations

from typing import Any, Union

import msgspec

from distserve.engine.decode import MigrationDone
from distserve.engine.outputs import RequestOutput
from distserve.engine.prefill import MigrationTicket
from distserve.request import SamplingParams


# ---- controller -> instance
class AddRequest(msgspec.Struct, tag=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float


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


class Failed(msgspec.Struct, tag=True):
    instance_id: str
    message: str


ToInstance = Union[AddRequest, AddMigration, Release, Abort, Shutdown]
ToController = Union[Ready, Outputs, Tickets, Migrated, Rejected, Stats, Failed]

_encoder = msgspec.msgpack.Encoder()
_to_instance = msgspec.msgpack.Decoder(ToInstance)
_to_controller = msgspec.msgpack.Decoder(ToController)


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decode_for_instance(data: bytes) -> ToInstance:
    return _to_instance.decode(data)


def decode_for_controller(data: bytes) -> ToController:
    return _to_controller.decode(data)
