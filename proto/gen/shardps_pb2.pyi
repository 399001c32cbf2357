from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_INT16: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]

class UpdateMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPDATE_MODE_UNSPECIFIED: _ClassVar[UpdateMode]
    UPDATE_MODE_SYNC: _ClassVar[UpdateMode]
    UPDATE_MODE_ASYNC: _ClassVar[UpdateMode]
    UPDATE_MODE_SSP: _ClassVar[UpdateMode]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT64: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_INT8: DType
DTYPE_UINT8: DType
DTYPE_INT16: DType
DTYPE_INT32: DType
DTYPE_INT64: DType
DTYPE_BOOL: DType
UPDATE_MODE_UNSPECIFIED: UpdateMode
UPDATE_MODE_SYNC: UpdateMode
UPDATE_MODE_ASYNC: UpdateMode
UPDATE_MODE_SSP: UpdateMode

class TensorChunk(_message.Message):
    __slots__ = ("dtype", "shape", "offset", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ParamInfo(_message.Message):
    __slots__ = ("name", "shape", "dtype", "offset", "group", "aliases")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    offset: int
    group: int
    aliases: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., offset: _Optional[int] = ..., group: _Optional[int] = ..., aliases: _Optional[_Iterable[str]] = ...) -> None: ...

class BufferInfo(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class Layout(_message.Message):
    __slots__ = ("params", "numel", "fingerprint")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    params: _containers.RepeatedCompositeFieldContainer[ParamInfo]
    numel: int
    fingerprint: str
    def __init__(self, params: _Optional[_Iterable[_Union[ParamInfo, _Mapping]]] = ..., numel: _Optional[int] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class OptimizerSpec(_message.Message):
    __slots__ = ("name", "kwargs_json", "groups")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KWARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kwargs_json: str
    groups: _containers.RepeatedCompositeFieldContainer[ParamGroupSpec]
    def __init__(self, name: _Optional[str] = ..., kwargs_json: _Optional[str] = ..., groups: _Optional[_Iterable[_Union[ParamGroupSpec, _Mapping]]] = ...) -> None: ...

class ParamGroupSpec(_message.Message):
    __slots__ = ("kwargs_json",)
    KWARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    kwargs_json: str
    def __init__(self, kwargs_json: _Optional[str] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("layout", "optimizer", "mode", "min_workers", "backup_workers", "staleness_aware_lr", "staleness_bound", "topk_ratio", "balance_every", "buffers", "broadcast_buffers", "name", "replicas", "first_step")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MIN_WORKERS_FIELD_NUMBER: _ClassVar[int]
    BACKUP_WORKERS_FIELD_NUMBER: _ClassVar[int]
    STALENESS_AWARE_LR_FIELD_NUMBER: _ClassVar[int]
    STALENESS_BOUND_FIELD_NUMBER: _ClassVar[int]
    TOPK_RATIO_FIELD_NUMBER: _ClassVar[int]
    BALANCE_EVERY_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    BROADCAST_BUFFERS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    FIRST_STEP_FIELD_NUMBER: _ClassVar[int]
    layout: Layout
    optimizer: OptimizerSpec
    mode: UpdateMode
    min_workers: int
    backup_workers: int
    staleness_aware_lr: bool
    staleness_bound: int
    topk_ratio: float
    balance_every: int
    buffers: _containers.RepeatedCompositeFieldContainer[BufferInfo]
    broadcast_buffers: bool
    name: str
    replicas: int
    first_step: int
    def __init__(self, layout: _Optional[_Union[Layout, _Mapping]] = ..., optimizer: _Optional[_Union[OptimizerSpec, _Mapping]] = ..., mode: _Optional[_Union[UpdateMode, str]] = ..., min_workers: _Optional[int] = ..., backup_workers: _Optional[int] = ..., staleness_aware_lr: _Optional[bool] = ..., staleness_bound: _Optional[int] = ..., topk_ratio: _Optional[float] = ..., balance_every: _Optional[int] = ..., buffers: _Optional[_Iterable[_Union[BufferInfo, _Mapping]]] = ..., broadcast_buffers: _Optional[bool] = ..., name: _Optional[str] = ..., replicas: _Optional[int] = ..., first_step: _Optional[int] = ...) -> None: ...

class ShardAssignment(_message.Message):
    __slots__ = ("shard_id", "start", "stop", "address", "backups")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BACKUPS_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    start: int
    stop: int
    address: str
    backups: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, shard_id: _Optional[int] = ..., start: _Optional[int] = ..., stop: _Optional[int] = ..., address: _Optional[str] = ..., backups: _Optional[_Iterable[str]] = ...) -> None: ...

class ShardPlan(_message.Message):
    __slots__ = ("shards", "numel", "align")
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    ALIGN_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedCompositeFieldContainer[ShardAssignment]
    numel: int
    align: int
    def __init__(self, shards: _Optional[_Iterable[_Union[ShardAssignment, _Mapping]]] = ..., numel: _Optional[int] = ..., align: _Optional[int] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("worker_id", "rank", "name", "device")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    rank: int
    name: str
    device: str
    def __init__(self, worker_id: _Optional[int] = ..., rank: _Optional[int] = ..., name: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class MembershipView(_message.Message):
    __slots__ = ("epoch", "start_step", "members")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    start_step: int
    members: _containers.RepeatedCompositeFieldContainer[Member]
    def __init__(self, epoch: _Optional[int] = ..., start_step: _Optional[int] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ...) -> None: ...

class CollectiveRequest(_message.Message):
    __slots__ = ("job_id", "worker_id", "name", "round", "payload", "timeout_ms")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    worker_id: int
    name: str
    round: int
    payload: bytes
    timeout_ms: int
    def __init__(self, job_id: _Optional[str] = ..., worker_id: _Optional[int] = ..., name: _Optional[str] = ..., round: _Optional[int] = ..., payload: _Optional[bytes] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class CollectiveResponse(_message.Message):
    __slots__ = ("done", "payloads", "epoch")
    DONE_FIELD_NUMBER: _ClassVar[int]
    PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    done: bool
    payloads: _containers.RepeatedScalarFieldContainer[bytes]
    epoch: int
    def __init__(self, done: _Optional[bool] = ..., payloads: _Optional[_Iterable[bytes]] = ..., epoch: _Optional[int] = ...) -> None: ...

class RegisterServerRequest(_message.Message):
    __slots__ = ("address", "shard_id")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    address: str
    shard_id: int
    def __init__(self, address: _Optional[str] = ..., shard_id: _Optional[int] = ...) -> None: ...

class RegisterServerResponse(_message.Message):
    __slots__ = ("shard_id", "num_servers")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_SERVERS_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    num_servers: int
    def __init__(self, shard_id: _Optional[int] = ..., num_servers: _Optional[int] = ...) -> None: ...

class RegisterWorkerRequest(_message.Message):
    __slots__ = ("job", "name", "device")
    JOB_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    job: JobSpec
    name: str
    device: str
    def __init__(self, job: _Optional[_Union[JobSpec, _Mapping]] = ..., name: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class RegisterWorkerResponse(_message.Message):
    __slots__ = ("job_id", "worker_id", "job", "plan", "initializer")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    INITIALIZER_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    worker_id: int
    job: JobSpec
    plan: ShardPlan
    initializer: bool
    def __init__(self, job_id: _Optional[str] = ..., worker_id: _Optional[int] = ..., job: _Optional[_Union[JobSpec, _Mapping]] = ..., plan: _Optional[_Union[ShardPlan, _Mapping]] = ..., initializer: _Optional[bool] = ...) -> None: ...

class WatchMembershipRequest(_message.Message):
    __slots__ = ("job_id", "after_epoch", "timeout_ms")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_epoch: int
    timeout_ms: int
    def __init__(self, job_id: _Optional[str] = ..., after_epoch: _Optional[int] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class WatchMembershipResponse(_message.Message):
    __slots__ = ("view",)
    VIEW_FIELD_NUMBER: _ClassVar[int]
    view: MembershipView
    def __init__(self, view: _Optional[_Union[MembershipView, _Mapping]] = ...) -> None: ...

class GetMembershipRequest(_message.Message):
    __slots__ = ("job_id", "epoch")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    epoch: int
    def __init__(self, job_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class GetMembershipResponse(_message.Message):
    __slots__ = ("view",)
    VIEW_FIELD_NUMBER: _ClassVar[int]
    view: MembershipView
    def __init__(self, view: _Optional[_Union[MembershipView, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_name", "job_id", "suspect")
    JOB_NAME_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SUSPECT_FIELD_NUMBER: _ClassVar[int]
    job_name: str
    job_id: str
    suspect: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job_name: _Optional[str] = ..., job_id: _Optional[str] = ..., suspect: _Optional[_Iterable[str]] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job_id", "job", "plan")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    job: JobSpec
    plan: ShardPlan
    def __init__(self, job_id: _Optional[str] = ..., job: _Optional[_Union[JobSpec, _Mapping]] = ..., plan: _Optional[_Union[ShardPlan, _Mapping]] = ...) -> None: ...

class LeaveJobRequest(_message.Message):
    __slots__ = ("job_id", "worker_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    worker_id: int
    def __init__(self, job_id: _Optional[str] = ..., worker_id: _Optional[int] = ...) -> None: ...

class LeaveJobResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("job_id", "worker_id", "step", "counters")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    worker_id: int
    step: int
    counters: _containers.ScalarMap[str, int]
    def __init__(self, job_id: _Optional[str] = ..., worker_id: _Optional[int] = ..., step: _Optional[int] = ..., counters: _Optional[_Mapping[str, int]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("epoch", "lease_ms", "waiting_for", "abandoned", "collectives_waiting")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_FIELD_NUMBER: _ClassVar[int]
    ABANDONED_FIELD_NUMBER: _ClassVar[int]
    COLLECTIVES_WAITING_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    lease_ms: int
    waiting_for: str
    abandoned: bool
    collectives_waiting: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, epoch: _Optional[int] = ..., lease_ms: _Optional[int] = ..., waiting_for: _Optional[str] = ..., abandoned: _Optional[bool] = ..., collectives_waiting: _Optional[_Iterable[str]] = ...) -> None: ...

class GetJobStatusRequest(_message.Message):
    __slots__ = ("job_name",)
    JOB_NAME_FIELD_NUMBER: _ClassVar[int]
    job_name: str
    def __init__(self, job_name: _Optional[str] = ...) -> None: ...

class ReportThroughputRequest(_message.Message):
    __slots__ = ("job_id", "worker_id", "window", "samples_per_second", "global_batch")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_BATCH_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    worker_id: int
    window: int
    samples_per_second: float
    global_batch: int
    def __init__(self, job_id: _Optional[str] = ..., worker_id: _Optional[int] = ..., window: _Optional[int] = ..., samples_per_second: _Optional[float] = ..., global_batch: _Optional[int] = ...) -> None: ...

class ReportThroughputResponse(_message.Message):
    __slots__ = ("batch_sizes",)
    BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, batch_sizes: _Optional[_Iterable[int]] = ...) -> None: ...

class ReportRestoreRequest(_message.Message):
    __slots__ = ("job_id", "shard_id", "version")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    shard_id: int
    version: int
    def __init__(self, job_id: _Optional[str] = ..., shard_id: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class ReportRestoreResponse(_message.Message):
    __slots__ = ("rollback",)
    ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    rollback: Rollback
    def __init__(self, rollback: _Optional[_Union[Rollback, _Mapping]] = ...) -> None: ...

class Rollback(_message.Message):
    __slots__ = ("shard_id", "from_version", "to_version", "epoch", "unix_time")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    UNIX_TIME_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    from_version: int
    to_version: int
    epoch: int
    unix_time: float
    def __init__(self, shard_id: _Optional[int] = ..., from_version: _Optional[int] = ..., to_version: _Optional[int] = ..., epoch: _Optional[int] = ..., unix_time: _Optional[float] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("shard_id", "address")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    address: str
    def __init__(self, shard_id: _Optional[int] = ..., address: _Optional[str] = ...) -> None: ...

class GetJobStatusResponse(_message.Message):
    __slots__ = ("job_id", "job", "plan", "view", "servers", "num_servers", "pending", "left_worker_ids", "rollbacks", "expired_worker_ids", "heartbeat_age_s", "worker_counters", "waiting_for", "job_names", "generation", "placement_epoch", "failovers")
    class HeartbeatAgeSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    class WorkerCountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: WorkerCounters
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[WorkerCounters, _Mapping]] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    NUM_SERVERS_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    LEFT_WORKER_IDS_FIELD_NUMBER: _ClassVar[int]
    ROLLBACKS_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_WORKER_IDS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    WORKER_COUNTERS_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_FIELD_NUMBER: _ClassVar[int]
    JOB_NAMES_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    FAILOVERS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    job: JobSpec
    plan: ShardPlan
    view: MembershipView
    servers: _containers.RepeatedCompositeFieldContainer[ServerInfo]
    num_servers: int
    pending: _containers.RepeatedCompositeFieldContainer[Member]
    left_worker_ids: _containers.RepeatedScalarFieldContainer[int]
    rollbacks: _containers.RepeatedCompositeFieldContainer[Rollback]
    expired_worker_ids: _containers.RepeatedScalarFieldContainer[int]
    heartbeat_age_s: _containers.ScalarMap[int, float]
    worker_counters: _containers.MessageMap[int, WorkerCounters]
    waiting_for: str
    job_names: _containers.RepeatedScalarFieldContainer[str]
    generation: int
    placement_epoch: int
    failovers: _containers.RepeatedCompositeFieldContainer[Failover]
    def __init__(self, job_id: _Optional[str] = ..., job: _Optional[_Union[JobSpec, _Mapping]] = ..., plan: _Optional[_Union[ShardPlan, _Mapping]] = ..., view: _Optional[_Union[MembershipView, _Mapping]] = ..., servers: _Optional[_Iterable[_Union[ServerInfo, _Mapping]]] = ..., num_servers: _Optional[int] = ..., pending: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., left_worker_ids: _Optional[_Iterable[int]] = ..., rollbacks: _Optional[_Iterable[_Union[Rollback, _Mapping]]] = ..., expired_worker_ids: _Optional[_Iterable[int]] = ..., heartbeat_age_s: _Optional[_Mapping[int, float]] = ..., worker_counters: _Optional[_Mapping[int, WorkerCounters]] = ..., waiting_for: _Optional[str] = ..., job_names: _Optional[_Iterable[str]] = ..., generation: _Optional[int] = ..., placement_epoch: _Optional[int] = ..., failovers: _Optional[_Iterable[_Union[Failover, _Mapping]]] = ...) -> None: ...

class Failover(_message.Message):
    __slots__ = ("shard_id", "from_server", "to_server", "placement_epoch", "unix_time", "reason")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_SERVER_FIELD_NUMBER: _ClassVar[int]
    TO_SERVER_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    UNIX_TIME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    from_server: int
    to_server: int
    placement_epoch: int
    unix_time: float
    reason: str
    def __init__(self, shard_id: _Optional[int] = ..., from_server: _Optional[int] = ..., to_server: _Optional[int] = ..., placement_epoch: _Optional[int] = ..., unix_time: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class WorkerCounters(_message.Message):
    __slots__ = ("step", "counters")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    step: int
    counters: _containers.ScalarMap[str, int]
    def __init__(self, step: _Optional[int] = ..., counters: _Optional[_Mapping[str, int]] = ...) -> None: ...

class SetReplicasRequest(_message.Message):
    __slots__ = ("coordinator_generation", "assignments", "lease_ms", "lease_from")
    COORDINATOR_GENERATION_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    LEASE_FROM_FIELD_NUMBER: _ClassVar[int]
    coordinator_generation: int
    assignments: _containers.RepeatedCompositeFieldContainer[ReplicaAssignment]
    lease_ms: int
    lease_from: LeaseClock
    def __init__(self, coordinator_generation: _Optional[int] = ..., assignments: _Optional[_Iterable[_Union[ReplicaAssignment, _Mapping]]] = ..., lease_ms: _Optional[int] = ..., lease_from: _Optional[_Union[LeaseClock, _Mapping]] = ...) -> None: ...

class LeaseClock(_message.Message):
    __slots__ = ("incarnation", "monotonic_ns")
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    MONOTONIC_NS_FIELD_NUMBER: _ClassVar[int]
    incarnation: bytes
    monotonic_ns: int
    def __init__(self, incarnation: _Optional[bytes] = ..., monotonic_ns: _Optional[int] = ...) -> None: ...

class ReplicaAssignment(_message.Message):
    __slots__ = ("job_id", "shard_id", "placement_epoch", "primary", "backups")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    BACKUPS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    shard_id: int
    placement_epoch: int
    primary: bool
    backups: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job_id: _Optional[str] = ..., shard_id: _Optional[int] = ..., placement_epoch: _Optional[int] = ..., primary: _Optional[bool] = ..., backups: _Optional[_Iterable[str]] = ...) -> None: ...

class SetReplicasResponse(_message.Message):
    __slots__ = ("reports", "clock")
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    reports: _containers.RepeatedCompositeFieldContainer[ReplicaReport]
    clock: LeaseClock
    def __init__(self, reports: _Optional[_Iterable[_Union[ReplicaReport, _Mapping]]] = ..., clock: _Optional[_Union[LeaseClock, _Mapping]] = ...) -> None: ...

class ReplicaReport(_message.Message):
    __slots__ = ("job_id", "shard_id", "unreachable", "in_sync")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_FIELD_NUMBER: _ClassVar[int]
    IN_SYNC_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    shard_id: int
    unreachable: _containers.RepeatedScalarFieldContainer[str]
    in_sync: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job_id: _Optional[str] = ..., shard_id: _Optional[int] = ..., unreachable: _Optional[_Iterable[str]] = ..., in_sync: _Optional[_Iterable[str]] = ...) -> None: ...

class ReplicateRequest(_message.Message):
    __slots__ = ("header", "chunk", "name")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    header: ReplicaHeader
    chunk: TensorChunk
    name: str
    def __init__(self, header: _Optional[_Union[ReplicaHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., name: _Optional[str] = ...) -> None: ...

class ReplicaHeader(_message.Message):
    __slots__ = ("job_id", "shard_id", "placement_epoch", "full", "version", "skipped", "present", "hyperparams_json", "lr_scale", "clip_partial", "last_step", "views_json", "min_epoch", "rolled_back_to")
    class LastStepEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    LR_SCALE_FIELD_NUMBER: _ClassVar[int]
    CLIP_PARTIAL_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    VIEWS_JSON_FIELD_NUMBER: _ClassVar[int]
    MIN_EPOCH_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_TO_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    shard_id: int
    placement_epoch: int
    full: bool
    version: int
    skipped: bool
    present: _containers.RepeatedScalarFieldContainer[bool]
    hyperparams_json: str
    lr_scale: float
    clip_partial: float
    last_step: _containers.ScalarMap[int, int]
    views_json: str
    min_epoch: int
    rolled_back_to: int
    def __init__(self, job_id: _Optional[str] = ..., shard_id: _Optional[int] = ..., placement_epoch: _Optional[int] = ..., full: _Optional[bool] = ..., version: _Optional[int] = ..., skipped: _Optional[bool] = ..., present: _Optional[_Iterable[bool]] = ..., hyperparams_json: _Optional[str] = ..., lr_scale: _Optional[float] = ..., clip_partial: _Optional[float] = ..., last_step: _Optional[_Mapping[int, int]] = ..., views_json: _Optional[str] = ..., min_epoch: _Optional[int] = ..., rolled_back_to: _Optional[int] = ...) -> None: ...

class ReplicateResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class SetMembershipRequest(_message.Message):
    __slots__ = ("job_id", "view", "from_open_step", "coordinator_generation")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    FROM_OPEN_STEP_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_GENERATION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    view: MembershipView
    from_open_step: bool
    coordinator_generation: int
    def __init__(self, job_id: _Optional[str] = ..., view: _Optional[_Union[MembershipView, _Mapping]] = ..., from_open_step: _Optional[bool] = ..., coordinator_generation: _Optional[int] = ...) -> None: ...

class SetMembershipResponse(_message.Message):
    __slots__ = ("accepted", "version")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    version: int
    def __init__(self, accepted: _Optional[bool] = ..., version: _Optional[int] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("at_version", "timeout_ms", "job_id")
    AT_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    at_version: int
    timeout_ms: int
    job_id: str
    def __init__(self, at_version: _Optional[int] = ..., timeout_ms: _Optional[int] = ..., job_id: _Optional[str] = ...) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("version", "path", "bytes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    version: int
    path: str
    bytes: int
    def __init__(self, version: _Optional[int] = ..., path: _Optional[str] = ..., bytes: _Optional[int] = ...) -> None: ...

class ListCheckpointsRequest(_message.Message):
    __slots__ = ("job_id", "shard_id", "job_name")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_NAME_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    shard_id: int
    job_name: str
    def __init__(self, job_id: _Optional[str] = ..., shard_id: _Optional[int] = ..., job_name: _Optional[str] = ...) -> None: ...

class ListCheckpointsResponse(_message.Message):
    __slots__ = ("shard_id", "job_id", "versions", "version", "awaiting_rollback")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AWAITING_ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    job_id: str
    versions: _containers.RepeatedScalarFieldContainer[int]
    version: int
    awaiting_rollback: bool
    def __init__(self, shard_id: _Optional[int] = ..., job_id: _Optional[str] = ..., versions: _Optional[_Iterable[int]] = ..., version: _Optional[int] = ..., awaiting_rollback: _Optional[bool] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("job_id", "version", "epoch", "coordinator_generation", "shard_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_GENERATION_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    version: int
    epoch: int
    coordinator_generation: int
    shard_id: int
    def __init__(self, job_id: _Optional[str] = ..., version: _Optional[int] = ..., epoch: _Optional[int] = ..., coordinator_generation: _Optional[int] = ..., shard_id: _Optional[int] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("from_version", "version")
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    from_version: int
    version: int
    def __init__(self, from_version: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class ShardTarget(_message.Message):
    __slots__ = ("job_id", "fingerprint", "shard_id", "start", "stop")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    fingerprint: str
    shard_id: int
    start: int
    stop: int
    def __init__(self, job_id: _Optional[str] = ..., fingerprint: _Optional[str] = ..., shard_id: _Optional[int] = ..., start: _Optional[int] = ..., stop: _Optional[int] = ...) -> None: ...

class InitShardRequest(_message.Message):
    __slots__ = ("target", "worker_id", "params", "replace", "buffers")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    target: ShardTarget
    worker_id: int
    params: TensorChunk
    replace: bool
    buffers: TensorChunk
    def __init__(self, target: _Optional[_Union[ShardTarget, _Mapping]] = ..., worker_id: _Optional[int] = ..., params: _Optional[_Union[TensorChunk, _Mapping]] = ..., replace: _Optional[bool] = ..., buffers: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class InitShardResponse(_message.Message):
    __slots__ = ("version", "already_initialized")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALREADY_INITIALIZED_FIELD_NUMBER: _ClassVar[int]
    version: int
    already_initialized: bool
    def __init__(self, version: _Optional[int] = ..., already_initialized: _Optional[bool] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("target", "worker_id", "step", "epoch", "base_version", "options", "shm", "link", "reply_dtype")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    LINK_FIELD_NUMBER: _ClassVar[int]
    REPLY_DTYPE_FIELD_NUMBER: _ClassVar[int]
    target: ShardTarget
    worker_id: int
    step: int
    epoch: int
    base_version: int
    options: StepOptions
    shm: ShmSegment
    link: LinkTransfer
    reply_dtype: DType
    def __init__(self, target: _Optional[_Union[ShardTarget, _Mapping]] = ..., worker_id: _Optional[int] = ..., step: _Optional[int] = ..., epoch: _Optional[int] = ..., base_version: _Optional[int] = ..., options: _Optional[_Union[StepOptions, _Mapping]] = ..., shm: _Optional[_Union[ShmSegment, _Mapping]] = ..., link: _Optional[_Union[LinkTransfer, _Mapping]] = ..., reply_dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class LinkTransfer(_message.Message):
    __slots__ = ("nonce", "parts")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    nonce: int
    parts: int
    def __init__(self, nonce: _Optional[int] = ..., parts: _Optional[int] = ...) -> None: ...

class OpenLinkRequest(_message.Message):
    __slots__ = ("target", "worker_id", "epoch")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    target: ShardTarget
    worker_id: int
    epoch: int
    def __init__(self, target: _Optional[_Union[ShardTarget, _Mapping]] = ..., worker_id: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class OpenLinkResponse(_message.Message):
    __slots__ = ("port", "ticket", "part_stops")
    PORT_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    PART_STOPS_FIELD_NUMBER: _ClassVar[int]
    port: int
    ticket: bytes
    part_stops: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, port: _Optional[int] = ..., ticket: _Optional[bytes] = ..., part_stops: _Optional[_Iterable[int]] = ...) -> None: ...

class ShmSegment(_message.Message):
    __slots__ = ("name", "nonce")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    nonce: bytes
    def __init__(self, name: _Optional[str] = ..., nonce: _Optional[bytes] = ...) -> None: ...

class StepOptions(_message.Message):
    __slots__ = ("batch_size", "hyperparams_json", "grad_mask", "overflow", "grad_scale", "clip_max_norm", "clip_norm_type")
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    GRAD_MASK_FIELD_NUMBER: _ClassVar[int]
    OVERFLOW_FIELD_NUMBER: _ClassVar[int]
    GRAD_SCALE_FIELD_NUMBER: _ClassVar[int]
    CLIP_MAX_NORM_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_TYPE_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    hyperparams_json: str
    grad_mask: bytes
    overflow: bool
    grad_scale: float
    clip_max_norm: float
    clip_norm_type: float
    def __init__(self, batch_size: _Optional[int] = ..., hyperparams_json: _Optional[str] = ..., grad_mask: _Optional[bytes] = ..., overflow: _Optional[bool] = ..., grad_scale: _Optional[float] = ..., clip_max_norm: _Optional[float] = ..., clip_norm_type: _Optional[float] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("header", "grad", "commit", "indices", "clip_total", "buffers", "scales")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    CLIP_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    grad: TensorChunk
    commit: PushCommit
    indices: TensorChunk
    clip_total: ClipTotal
    buffers: TensorChunk
    scales: TensorChunk
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., grad: _Optional[_Union[TensorChunk, _Mapping]] = ..., commit: _Optional[_Union[PushCommit, _Mapping]] = ..., indices: _Optional[_Union[TensorChunk, _Mapping]] = ..., clip_total: _Optional[_Union[ClipTotal, _Mapping]] = ..., buffers: _Optional[_Union[TensorChunk, _Mapping]] = ..., scales: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class PushCommit(_message.Message):
    __slots__ = ("options",)
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    options: StepOptions
    def __init__(self, options: _Optional[_Union[StepOptions, _Mapping]] = ...) -> None: ...

class ClipPartial(_message.Message):
    __slots__ = ("step", "partial")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    step: int
    partial: float
    def __init__(self, step: _Optional[int] = ..., partial: _Optional[float] = ...) -> None: ...

class ClipTotal(_message.Message):
    __slots__ = ("step", "total_norm")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NORM_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_norm: float
    def __init__(self, step: _Optional[int] = ..., total_norm: _Optional[float] = ...) -> None: ...

class PushResult(_message.Message):
    __slots__ = ("version", "staleness", "duplicate", "dropped", "next_step", "applied_lr", "epoch", "skipped")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEP_FIELD_NUMBER: _ClassVar[int]
    APPLIED_LR_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    version: int
    staleness: int
    duplicate: bool
    dropped: bool
    next_step: int
    applied_lr: float
    epoch: int
    skipped: bool
    def __init__(self, version: _Optional[int] = ..., staleness: _Optional[int] = ..., duplicate: _Optional[bool] = ..., dropped: _Optional[bool] = ..., next_step: _Optional[int] = ..., applied_lr: _Optional[float] = ..., epoch: _Optional[int] = ..., skipped: _Optional[bool] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("result", "params", "clip_partial", "buffers")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    CLIP_PARTIAL_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    result: PushResult
    params: TensorChunk
    clip_partial: ClipPartial
    buffers: TensorChunk
    def __init__(self, result: _Optional[_Union[PushResult, _Mapping]] = ..., params: _Optional[_Union[TensorChunk, _Mapping]] = ..., clip_partial: _Optional[_Union[ClipPartial, _Mapping]] = ..., buffers: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("target", "include_optimizer_state", "min_version", "include_buffers", "epoch")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_OPTIMIZER_STATE_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_BUFFERS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    target: ShardTarget
    include_optimizer_state: bool
    min_version: int
    include_buffers: bool
    epoch: int
    def __init__(self, target: _Optional[_Union[ShardTarget, _Mapping]] = ..., include_optimizer_state: _Optional[bool] = ..., min_version: _Optional[int] = ..., include_buffers: _Optional[bool] = ..., epoch: _Optional[int] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ("version", "chunk", "name", "hyperparams_json")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    version: int
    chunk: TensorChunk
    name: str
    hyperparams_json: str
    def __init__(self, version: _Optional[int] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., name: _Optional[str] = ..., hyperparams_json: _Optional[str] = ...) -> None: ...

class LoadStateRequest(_message.Message):
    __slots__ = ("target", "hyperparams_json", "name", "chunk")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    target: ShardTarget
    hyperparams_json: str
    name: str
    chunk: TensorChunk
    def __init__(self, target: _Optional[_Union[ShardTarget, _Mapping]] = ..., hyperparams_json: _Optional[str] = ..., name: _Optional[str] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class LoadStateResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class GetShardStatusRequest(_message.Message):
    __slots__ = ("include_digest", "job_id", "shard_id")
    INCLUDE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    include_digest: bool
    job_id: str
    shard_id: int
    def __init__(self, include_digest: _Optional[bool] = ..., job_id: _Optional[str] = ..., shard_id: _Optional[int] = ...) -> None: ...

class GetShardStatusResponse(_message.Message):
    __slots__ = ("shard_id", "job_id", "mode", "start", "stop", "initialized", "version", "pushes_received", "pushes_rejected", "pushes_duplicate", "bytes_in", "bytes_out", "workers_seen", "staleness_counts", "apply_seconds", "state_digest", "rejections", "worker_last_push_unix", "worker_last_step", "pushes_dropped", "wait_seconds", "checkpoints_written", "last_checkpoint_version", "checkpoint_failures", "rollbacks", "steps_rolled_back", "restored_from_version", "restored", "pushes_skipped", "job_ids", "worker_transport", "shm_bytes_in", "shm_bytes_out", "replica_role", "placement_epoch", "replica_shards", "updates_replicated", "copies_sent", "lease_remaining_ms")
    class StalenessCountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    class RejectionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class WorkerLastPushUnixEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    class WorkerLastStepEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    class WorkerTransportEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: str
        def __init__(self, key: _Optional[int] = ..., value: _Optional[str] = ...) -> None: ...
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    INITIALIZED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PUSHES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    PUSHES_REJECTED_FIELD_NUMBER: _ClassVar[int]
    PUSHES_DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    WORKERS_SEEN_FIELD_NUMBER: _ClassVar[int]
    STALENESS_COUNTS_FIELD_NUMBER: _ClassVar[int]
    APPLY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STATE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    WORKER_LAST_PUSH_UNIX_FIELD_NUMBER: _ClassVar[int]
    WORKER_LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    PUSHES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECKPOINT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FAILURES_FIELD_NUMBER: _ClassVar[int]
    ROLLBACKS_FIELD_NUMBER: _ClassVar[int]
    STEPS_ROLLED_BACK_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FIELD_NUMBER: _ClassVar[int]
    PUSHES_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    WORKER_TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    SHM_BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    SHM_BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ROLE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    REPLICA_SHARDS_FIELD_NUMBER: _ClassVar[int]
    UPDATES_REPLICATED_FIELD_NUMBER: _ClassVar[int]
    COPIES_SENT_FIELD_NUMBER: _ClassVar[int]
    LEASE_REMAINING_MS_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    job_id: str
    mode: UpdateMode
    start: int
    stop: int
    initialized: bool
    version: int
    pushes_received: int
    pushes_rejected: int
    pushes_duplicate: int
    bytes_in: int
    bytes_out: int
    workers_seen: _containers.RepeatedScalarFieldContainer[int]
    staleness_counts: _containers.ScalarMap[int, int]
    apply_seconds: float
    state_digest: str
    rejections: _containers.ScalarMap[str, int]
    worker_last_push_unix: _containers.ScalarMap[int, float]
    worker_last_step: _containers.ScalarMap[int, int]
    pushes_dropped: int
    wait_seconds: float
    checkpoints_written: int
    last_checkpoint_version: int
    checkpoint_failures: int
    rollbacks: int
    steps_rolled_back: int
    restored_from_version: int
    restored: bool
    pushes_skipped: int
    job_ids: _containers.RepeatedScalarFieldContainer[str]
    worker_transport: _containers.ScalarMap[int, str]
    shm_bytes_in: int
    shm_bytes_out: int
    replica_role: str
    placement_epoch: int
    replica_shards: _containers.RepeatedScalarFieldContainer[int]
    updates_replicated: int
    copies_sent: int
    lease_remaining_ms: int
    def __init__(self, shard_id: _Optional[int] = ..., job_id: _Optional[str] = ..., mode: _Optional[_Union[UpdateMode, str]] = ..., start: _Optional[int] = ..., stop: _Optional[int] = ..., initialized: _Optional[bool] = ..., version: _Optional[int] = ..., pushes_received: _Optional[int] = ..., pushes_rejected: _Optional[int] = ..., pushes_duplicate: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., workers_seen: _Optional[_Iterable[int]] = ..., staleness_counts: _Optional[_Mapping[int, int]] = ..., apply_seconds: _Optional[float] = ..., state_digest: _Optional[str] = ..., rejections: _Optional[_Mapping[str, int]] = ..., worker_last_push_unix: _Optional[_Mapping[int, float]] = ..., worker_last_step: _Optional[_Mapping[int, int]] = ..., pushes_dropped: _Optional[int] = ..., wait_seconds: _Optional[float] = ..., checkpoints_written: _Optional[int] = ..., last_checkpoint_version: _Optional[int] = ..., checkpoint_failures: _Optional[int] = ..., rollbacks: _Optional[int] = ..., steps_rolled_back: _Optional[int] = ..., restored_from_version: _Optional[int] = ..., restored: _Optional[bool] = ..., pushes_skipped: _Optional[int] = ..., job_ids: _Optional[_Iterable[str]] = ..., worker_transport: _Optional[_Mapping[int, str]] = ..., shm_bytes_in: _Optional[int] = ..., shm_bytes_out: _Optional[int] = ..., replica_role: _Optional[str] = ..., placement_epoch: _Optional[int] = ..., replica_shards: _Optional[_Iterable[int]] = ..., updates_replicated: _Optional[int] = ..., copies_sent: _Optional[int] = ..., lease_remaining_ms: _Optional[int] = ...) -> None: ...

class FaultRule(_message.Message):
    __slots__ = ("id", "kind", "method", "worker_id", "probability", "delay_s", "status", "after", "max_active", "max_count", "duration_s", "injected")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    DELAY_S_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    MAX_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    MAX_COUNT_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    INJECTED_FIELD_NUMBER: _ClassVar[int]
    id: int
    kind: str
    method: str
    worker_id: int
    probability: float
    delay_s: float
    status: str
    after: bool
    max_active: int
    max_count: int
    duration_s: float
    injected: int
    def __init__(self, id: _Optional[int] = ..., kind: _Optional[str] = ..., method: _Optional[str] = ..., worker_id: _Optional[int] = ..., probability: _Optional[float] = ..., delay_s: _Optional[float] = ..., status: _Optional[str] = ..., after: _Optional[bool] = ..., max_active: _Optional[int] = ..., max_count: _Optional[int] = ..., duration_s: _Optional[float] = ..., injected: _Optional[int] = ...) -> None: ...

class SetFaultsRequest(_message.Message):
    __slots__ = ("add", "clear")
    ADD_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    add: _containers.RepeatedCompositeFieldContainer[FaultRule]
    clear: bool
    def __init__(self, add: _Optional[_Iterable[_Union[FaultRule, _Mapping]]] = ..., clear: _Optional[bool] = ...) -> None: ...

class SetFaultsResponse(_message.Message):
    __slots__ = ("rules",)
    RULES_FIELD_NUMBER: _ClassVar[int]
    rules: _containers.RepeatedCompositeFieldContainer[FaultRule]
    def __init__(self, rules: _Optional[_Iterable[_Union[FaultRule, _Mapping]]] = ...) -> None: ...

class GetFaultsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetFaultsResponse(_message.Message):
    __slots__ = ("rules", "injected")
    class InjectedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    RULES_FIELD_NUMBER: _ClassVar[int]
    INJECTED_FIELD_NUMBER: _ClassVar[int]
    rules: _containers.RepeatedCompositeFieldContainer[FaultRule]
    injected: _containers.ScalarMap[str, int]
    def __init__(self, rules: _Optional[_Iterable[_Union[FaultRule, _Mapping]]] = ..., injected: _Optional[_Mapping[str, int]] = ...) -> None: ...
