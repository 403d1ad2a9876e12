"""Top examples per window of training (docs/dashboard.md): a window is a step range (of one epoch or of
all); its rows are the window's own exact top-k per query and kind. Stored windows (phases, tenths of
training, epochs) are written with the job's results; other step ranges are computed on demand by a worker
and kept here as a cache (the same table, ``kind`` ``range``)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from server.db.models import Base, _now
from server.db.states import QueryStatus

__all__ = ["ANY_EPOCH", "TopKWindow", "WindowTopKRow"]

ANY_EPOCH = -1  # a window of every epoch (a NULL would make the cache's unique key never match)


class TopKWindow(Base):
    """One window of one job's query set; ``status`` follows the query lifecycle (queued -> succeeded | failed)."""

    __tablename__ = "topk_windows"
    __table_args__ = (
        UniqueConstraint("job_id", "query_set", "kind", "step_min", "step_max", "epoch", name="uq_topk_windows_key"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    query_set: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(8))  # phase | tenth | epoch | range
    name: Mapped[str] = mapped_column(String(64))
    step_min: Mapped[int] = mapped_column(Integer)
    step_max: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer, default=ANY_EPOCH)
    top_k: Mapped[int] = mapped_column(Integer)
    occurrences: Mapped[int | None] = mapped_column(BigInteger)  # in the window, once computed
    status: Mapped[str] = mapped_column(String(20), default=QueryStatus.QUEUED)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


class WindowTopKRow(Base):
    __tablename__ = "window_topk_rows"
    # The unique key is also the index that serves a page of one window's query and kind.
    __table_args__ = (UniqueConstraint("window_id", "query", "kind", "rank", name="uq_window_topk_rows_position"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    window_id: Mapped[int] = mapped_column(ForeignKey("topk_windows.id", ondelete="CASCADE"))
    query: Mapped[int] = mapped_column(Integer)  # -1: the whole query set (mean over its queries)
    kind: Mapped[str] = mapped_column(String(8))  # helpful | harmful
    rank: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)
    row: Mapped[int] = mapped_column(BigInteger)
    step: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer)
    example_id: Mapped[str] = mapped_column(String(255))
    label: Mapped[str | None] = mapped_column(String(255))
    source: Mapped[str | None] = mapped_column(String(255))
