"""The batches the outbox holds: sealed for the cloud, or rejected by it; and its stats."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

__all__ = ["OutboxStats", "Rejected", "Sealed", "check_aware", "from_us", "to_us"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_us(when: datetime) -> int:
    """Microseconds since the Unix epoch of an aware ``when``."""
    delta = when - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(us: int) -> datetime:
    """The UTC datetime ``us`` microseconds after the Unix epoch."""
    return _EPOCH + timedelta(microseconds=us)


def check_aware(where: str, value: object) -> datetime:
    """``value`` if it is a timezone-aware datetime; else ``ValueError`` naming ``where``."""
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        msg = f"{where} must be a timezone-aware datetime; got {value!r}. Hint: datetime.now(UTC)"
        raise ValueError(msg)
    return value


@dataclass(frozen=True)
class Sealed:
    """One batch ready for the cloud: ``payload`` is a serialized ``uplink_pb2.Batch``.

    The other fields repeat what the outbox needs to order, cap and report
    batches without parsing the payload.
    """

    batch_id: str
    stream: str
    priority: int
    rows: int
    raw_bytes: int
    created_at: datetime
    payload: bytes

    def __post_init__(self) -> None:
        for name in ("batch_id", "stream"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                msg = f"Sealed.{name} must be a non-empty string; got {value!r}"
                raise ValueError(msg)
        for name in ("priority", "rows", "raw_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                msg = (
                    f"Sealed.{name} of batch {self.batch_id!r} must be a non-negative int; "
                    f"got {value!r}"
                )
                raise ValueError(msg)
        check_aware(f"Sealed.created_at of batch {self.batch_id!r}", self.created_at)
        if not isinstance(self.payload, bytes | bytearray | memoryview):
            msg = (
                f"Sealed.payload of batch {self.batch_id!r} must be bytes (a serialized "
                f"uplink_pb2.Batch); got {type(self.payload).__name__}"
            )
            raise TypeError(msg)


@dataclass(frozen=True)
class OutboxStats:
    """What is waiting, and what was dropped since the outbox file was created.

    ``bytes`` sums the serialized batches (the SQLite file is somewhat
    larger); ``oldest_age_s`` is None when the outbox is empty;
    ``dropped_full`` counts batches dropped by the byte cap (stored ones
    evicted and new ones refused), ``expired`` those dropped by the TTL and
    ``rejected`` those the cloud refused.
    """

    batches: int
    bytes: int
    oldest_age_s: float | None
    dropped_full: int
    expired: int
    rejected: int = 0


@dataclass(frozen=True)
class Rejected:
    """A batch the cloud answered with ``REJECTED``, kept for inspection."""

    batch_id: str
    stream: str
    priority: int
    rows: int
    raw_bytes: int
    created_at: datetime
    rejected_at: datetime
    detail: str
    payload: bytes
