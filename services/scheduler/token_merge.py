"""Token deltas of several worker messages joined per job, in the order they came: a scheduler behind a worker
records and streams each job's tokens of several engine steps at once (one job-store call for all, one client
message per job) instead of step by step. A job's deltas are taken out before any other message about that job is
handled, so nothing is reordered around a finish, a preemption or an abort's acknowledgement."""
from __future__ import annotations

from collections.abc import Iterable

TokenDelta = tuple[str, list[int], str]      # (job id, token ids, text), as JobStore.append_many takes them


class TokenMerge:
    def __init__(self):
        self._jobs: dict[str, tuple[list[int], list[str]]] = {}     # job id -> (token ids, text pieces), in order

    def add(self, deltas) -> None:
        """A TokenEvents message's deltas (each with job_id, token_ids, text)."""
        for d in deltas:
            ids, texts = self._jobs.setdefault(d.job_id, ([], []))
            ids.extend(d.token_ids)
            texts.append(d.text)

    def take(self, job_ids: Iterable[str]) -> list[TokenDelta]:
        """The merged deltas of these jobs (those that have any), out of the merge."""
        return [self._delta(job_id, *self._jobs.pop(job_id)) for job_id in job_ids if job_id in self._jobs]

    def take_all(self) -> list[TokenDelta]:
        out = [self._delta(job_id, *pending) for job_id, pending in self._jobs.items()]
        self._jobs.clear()
        return out

    @staticmethod
    def _delta(job_id: str, ids: list[int], texts: list[str]) -> TokenDelta:
        return job_id, ids, "".join(texts)
