from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Batch(_message.Message):
    __slots__ = ("edge_id", "batch_id", "stream", "priority", "rows", "arrow_ipc", "raw_bytes", "created_at_us")
    EDGE_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ARROW_IPC_FIELD_NUMBER: _ClassVar[int]
    RAW_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_US_FIELD_NUMBER: _ClassVar[int]
    edge_id: str
    batch_id: str
    stream: str
    priority: int
    rows: int
    arrow_ipc: bytes
    raw_bytes: int
    created_at_us: int
    def __init__(self, edge_id: _Optional[str] = ..., batch_id: _Optional[str] = ..., stream: _Optional[str] = ..., priority: _Optional[int] = ..., rows: _Optional[int] = ..., arrow_ipc: _Optional[bytes] = ..., raw_bytes: _Optional[int] = ..., created_at_us: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("batch_id", "status", "detail")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[Ack.Status]
        STORED: _ClassVar[Ack.Status]
        DUPLICATE: _ClassVar[Ack.Status]
        REJECTED: _ClassVar[Ack.Status]
    STATUS_UNSPECIFIED: Ack.Status
    STORED: Ack.Status
    DUPLICATE: Ack.Status
    REJECTED: Ack.Status
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    status: Ack.Status
    detail: str
    def __init__(self, batch_id: _Optional[str] = ..., status: _Optional[_Union[Ack.Status, str]] = ..., detail: _Optional[str] = ...) -> None: ...
