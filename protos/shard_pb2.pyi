from protos import generate_pb2 as _generate_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MigrationReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MIGRATION_REASON_UNSPECIFIED: _ClassVar[MigrationReason]
    MIGRATION_REASON_KV_EXHAUSTED: _ClassVar[MigrationReason]
    MIGRATION_REASON_DRAINING: _ClassVar[MigrationReason]
MIGRATION_REASON_UNSPECIFIED: MigrationReason
MIGRATION_REASON_KV_EXHAUSTED: MigrationReason
MIGRATION_REASON_DRAINING: MigrationReason

class ResumeState(_message.Message):
    __slots__ = ("generated_token_ids", "queue_time_s", "time_to_first_token_s", "migrations")
    GENERATED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_TIME_S_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    MIGRATIONS_FIELD_NUMBER: _ClassVar[int]
    generated_token_ids: _containers.RepeatedScalarFieldContainer[int]
    queue_time_s: float
    time_to_first_token_s: float
    migrations: int
    def __init__(self, generated_token_ids: _Optional[_Iterable[int]] = ..., queue_time_s: _Optional[float] = ..., time_to_first_token_s: _Optional[float] = ..., migrations: _Optional[int] = ...) -> None: ...

class ShardGenerateRequest(_message.Message):
    __slots__ = ("request", "resume")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    request: _generate_pb2.GenerateRequest
    resume: ResumeState
    def __init__(self, request: _Optional[_Union[_generate_pb2.GenerateRequest, _Mapping]] = ..., resume: _Optional[_Union[ResumeState, _Mapping]] = ...) -> None: ...

class Migration(_message.Message):
    __slots__ = ("reason", "generated_token_ids")
    REASON_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    reason: MigrationReason
    generated_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, reason: _Optional[_Union[MigrationReason, str]] = ..., generated_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ShardGenerateResponse(_message.Message):
    __slots__ = ("chunk", "migration")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_FIELD_NUMBER: _ClassVar[int]
    chunk: _generate_pb2.GenerateResponse
    migration: Migration
    def __init__(self, chunk: _Optional[_Union[_generate_pb2.GenerateResponse, _Mapping]] = ..., migration: _Optional[_Union[Migration, _Mapping]] = ...) -> None: ...

class WatchLoadRequest(_message.Message):
    __slots__ = ("residency_deltas", "min_interval_ms", "heartbeat_ms", "prefix_keys")
    RESIDENCY_DELTAS_FIELD_NUMBER: _ClassVar[int]
    MIN_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_MS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_KEYS_FIELD_NUMBER: _ClassVar[int]
    residency_deltas: bool
    min_interval_ms: int
    heartbeat_ms: int
    prefix_keys: bool
    def __init__(self, residency_deltas: _Optional[bool] = ..., min_interval_ms: _Optional[int] = ..., heartbeat_ms: _Optional[int] = ..., prefix_keys: _Optional[bool] = ...) -> None: ...

class LoadSnapshot(_message.Message):
    __slots__ = ("shard_id", "sequence", "running", "max_batch_size", "kv_pages_free", "kv_pages_total", "kv_page_size", "queued", "adapters_resident", "draining", "tp_size", "max_context", "kv_pages_queued", "adapters_delta", "adapters_added", "adapters_removed", "idle_s", "prefix_keys", "prefix_keys_delta", "prefix_keys_added", "prefix_keys_removed")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_PAGES_FREE_FIELD_NUMBER: _ClassVar[int]
    KV_PAGES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_RESIDENT_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    KV_PAGES_QUEUED_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_DELTA_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_ADDED_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    IDLE_S_FIELD_NUMBER: _ClassVar[int]
    PREFIX_KEYS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_KEYS_DELTA_FIELD_NUMBER: _ClassVar[int]
    PREFIX_KEYS_ADDED_FIELD_NUMBER: _ClassVar[int]
    PREFIX_KEYS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    sequence: int
    running: int
    max_batch_size: int
    kv_pages_free: int
    kv_pages_total: int
    kv_page_size: int
    queued: int
    adapters_resident: _containers.RepeatedScalarFieldContainer[str]
    draining: bool
    tp_size: int
    max_context: int
    kv_pages_queued: int
    adapters_delta: bool
    adapters_added: _containers.RepeatedScalarFieldContainer[str]
    adapters_removed: _containers.RepeatedScalarFieldContainer[str]
    idle_s: float
    prefix_keys: _containers.RepeatedScalarFieldContainer[int]
    prefix_keys_delta: bool
    prefix_keys_added: _containers.RepeatedScalarFieldContainer[int]
    prefix_keys_removed: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, shard_id: _Optional[str] = ..., sequence: _Optional[int] = ..., running: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., kv_pages_free: _Optional[int] = ..., kv_pages_total: _Optional[int] = ..., kv_page_size: _Optional[int] = ..., queued: _Optional[int] = ..., adapters_resident: _Optional[_Iterable[str]] = ..., draining: _Optional[bool] = ..., tp_size: _Optional[int] = ..., max_context: _Optional[int] = ..., kv_pages_queued: _Optional[int] = ..., adapters_delta: _Optional[bool] = ..., adapters_added: _Optional[_Iterable[str]] = ..., adapters_removed: _Optional[_Iterable[str]] = ..., idle_s: _Optional[float] = ..., prefix_keys: _Optional[_Iterable[int]] = ..., prefix_keys_delta: _Optional[bool] = ..., prefix_keys_added: _Optional[_Iterable[int]] = ..., prefix_keys_removed: _Optional[_Iterable[int]] = ...) -> None: ...

class WatchLoadResponse(_message.Message):
    __slots__ = ("snapshot",)
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    snapshot: LoadSnapshot
    def __init__(self, snapshot: _Optional[_Union[LoadSnapshot, _Mapping]] = ...) -> None: ...

class LoadAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "pin")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    pin: bool
    def __init__(self, adapter_id: _Optional[str] = ..., pin: _Optional[bool] = ...) -> None: ...

class LoadAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: _generate_pb2.AdapterInfo
    def __init__(self, adapter: _Optional[_Union[_generate_pb2.AdapterInfo, _Mapping]] = ...) -> None: ...

class EvictAdapterRequest(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class EvictAdapterResponse(_message.Message):
    __slots__ = ("evicted",)
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    evicted: bool
    def __init__(self, evicted: _Optional[bool] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("running",)
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    running: int
    def __init__(self, running: _Optional[int] = ...) -> None: ...
