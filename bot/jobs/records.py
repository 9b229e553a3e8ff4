"""Reading a job back, and recording that it failed: the two store calls every part of the job service makes.

A state change returns the job as it left it (`JobRepository`), so a part reads a job again only when the
change did not happen: then the row says what became of it.
"""

from __future__ import annotations

from typing import Any

from bot.jobs.model import Job
from bot.modelslab.client import ErrorKind
from bot.storage.ports import JobRepository


async def reload_job(store: JobRepository, job_id: str) -> Job:
    job = await store.get(job_id)
    assert job is not None, "jobs are never deleted while being driven"
    return job


async def changed_or_reloaded(store: JobRepository, job_id: str, changed: Job | None) -> Job:
    """The job as a state change left it; if the change did not happen, as it now is."""
    return changed if changed is not None else await reload_job(store, job_id)


async def fail_job(store: JobRepository, job_id: str, kind: ErrorKind, detail: str, **extra: Any) -> Job:
    """Fail the job (if its state still allows it: a finished job keeps its outcome) and return it as it now is."""
    failed = await store.finish_failure(job_id, kind=kind, detail=detail, **extra)
    return await changed_or_reloaded(store, job_id, failed)
