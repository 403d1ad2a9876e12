"""The workers' Celery app (same broker settings as the API's sender)."""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery
from celery.signals import worker_process_init

from server.db.session import get_engine
from server.settings import get_settings
from server.storage import forget_storage
from server.tasks import configure

app = configure(Celery("dvemb-worker", include=["worker.tasks"]), get_settings())


@worker_process_init.connect
def _fresh_connections(**_: Any) -> None:
    # A forked worker must not share the parent's database connections.
    get_engine().dispose(close=False)
    forget_storage()  # its own object-store client (obstore's runtime does not survive a fork)
    refuse_cuda_after_fork()


def refuse_cuda_after_fork() -> None:
    """A prefork child whose parent had started CUDA cannot use the GPU (torch raises at the first CUDA call, deep
    in a job): stop at the start instead, with the fix."""
    import torch

    if torch.cuda._is_in_bad_fork():
        # Celery logs and swallows what a signal handler raises: the child must exit itself.
        logging.getLogger(__name__).critical(
            "CUDA was initialised in the worker's parent process before it forked this child: run GPU workers "
            "with `dvemb worker --devices 0,1,...` (one solo-pool process per device), not a prefork pool"
        )
        os._exit(1)
