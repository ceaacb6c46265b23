"""How attempts end: succeeded, failed or cancelled (`finish`), preempted, failed on a
node and retried elsewhere, released by a dead replica, or lost with an expired lease.
Each ending is one transaction with the ledger rows of the work it did, and is written
only while the attempt still holds its lease, so no render is charged twice."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from farm.domain.states import AttemptOutcome, RenderState
from farm.jobs import schema as t
from farm.jobs.records import ProgressUpdate, RenderRecord
from farm.jobs.store.leases import LeasesStore
from farm.jobs.store.renders import RendersStore
from farm.metering.cost import Charge


class OutcomesStore(LeasesStore, RendersStore):
    """Ends leased attempts (LeasesStore) and answers with the render (RendersStore.get)."""

    def finish(
        self,
        owner: str,
        render_id: str,
        attempt: int,
        outcome: AttemptOutcome,
        *,
        charges: list[Charge] = (),
        absorbed: list[Charge] = (),
        artifact_uri: str | None = None,
        manifest_uri: str | None = None,
        error: str | None = None,
        device_kind: str | None = None,
        node: str | None = None,
        timings: list | None = None,
        quality: dict | None = None,
        candidates: list[dict] | None = None,
        progress: Sequence[ProgressUpdate] = (),
    ) -> RenderRecord | None:
        """Ends an attempt and its render in one transaction with its ledger rows, after
        `progress` (its last events not yet written: they come before the final one).
        Returns None, writing nothing, when the attempt no longer holds the lease (a
        replay, or a zombie attempt after a requeue): a render is never charged twice.
        `absorbed` are earlier work of this attempt that the farm does not charge."""
        state = {
            AttemptOutcome.SUCCEEDED: RenderState.SUCCEEDED,
            AttemptOutcome.FAILED: RenderState.FAILED,
            AttemptOutcome.CANCELLED: RenderState.CANCELLED,
        }[outcome]
        with self._db.write() as session:
            self._record_progress(session, owner, progress)
            row = self._charge_attempt(session, owner, render_id, attempt, outcome, error, charges, device_kind,
                                       node, timings)
            if row is None:
                return None
            row.artifact_uri, row.manifest_uri, row.error = artifact_uri, manifest_uri, error
            row.device_kind = device_kind or row.device_kind
            row.quality_json = json.dumps(quality) if quality is not None else None
            row.candidates_json = json.dumps(candidates) if candidates is not None else None
            message = {"SUCCEEDED": "succeeded", "FAILED": f"failed: {error}", "CANCELLED": "cancelled"}[state.value]
            self._finish_row(session, row, state, message=message)
            return self._record(session, row)

    def preempt(self, owner: str, render_id: str, attempt: int, *, checkpoint_uri: str | None, step: int,
                charges: list[Charge] = (), device_kind: str | None = None, node: str | None = None,
                timings: list | None = None, counted: bool = True, checkpoint_seconds: float | None = None) -> bool:
        """Ends an attempt that gave its engine to a higher-priority render: the steps it
        did are charged (the next attempt resumes from its checkpoint instead of redoing
        them), and the render is queued again with attempt + 1. A lease already lost
        writes nothing (False). `counted=False` for a render taken back from a replica's
        queue before it started: nothing to resume, not a preemption the client sees."""
        with self._db.write() as session:
            row = self._charge_attempt(session, owner, render_id, attempt, AttemptOutcome.PREEMPTED, None,
                                       charges, device_kind, node, timings)
            if row is None:
                return False
            row.preemptions += 1 if counted else 0
            if checkpoint_uri:
                row.checkpoint_uri, row.checkpoint_step = checkpoint_uri, step
            if row.cancel_requested:
                self._finish_row(session, row, RenderState.CANCELLED, message=f"cancelled (preempted at step {step})")
            else:
                written = f" (written in {checkpoint_seconds:.3f} s)" if checkpoint_seconds is not None else ""
                self._back_to_queue(session, row, f"preempted at step {step}; resumes from its checkpoint{written}")
            return True

    def retry_elsewhere(self, owner: str, render_id: str, attempt: int, *, error: str, node: str | None,
                        failed_node_limit: int, charges: list[Charge] = (), device_kind: str | None = None,
                        timings: list | None = None) -> RenderRecord | None:
        """An engine failed the attempt on `node`: the render is queued again (its next
        attempt goes to a node it has not failed on, where its pool has one: see
        `ClaimedRender.failed_nodes`), unless an engine has now failed it
        `failed_node_limit` times; then it fails with every node's reason. Failed attempts
        are counted, not nodes: a farm with fewer nodes than the limit would otherwise
        retry a render that fails wherever it runs for ever. Work done is charged like a
        failed render's."""
        with self._db.write() as session:
            row = self._charge_attempt(session, owner, render_id, attempt, AttemptOutcome.RETRIED, error,
                                       charges, device_kind, node, timings)
            if row is None:
                return None
            failures = session.execute(
                select(t.Attempt.node, t.Attempt.error).where(
                    t.Attempt.render_id == row.id, t.Attempt.outcome == AttemptOutcome.RETRIED.value)
                .order_by(t.Attempt.number)).all()
            if row.cancel_requested:
                self._finish_row(session, row, RenderState.CANCELLED, message="cancelled")
            elif len(failures) >= failed_node_limit:
                row.error = _failures_message(failures)
                self._finish_row(session, row, RenderState.FAILED, message=row.error)
            else:
                self._back_to_queue(session, row,
                                    f"failed on {node or 'an unknown node'} ({error}); retrying elsewhere")
        return self.get(None, render_id)

    def attempt_outcome(self, owner: str, render_id: str, attempt: int) -> AttemptOutcome | None:
        """How `owner` ended that attempt (None: not ended, or not by `owner`): what a
        scheduler asks after an ending whose answer it lost."""
        with self._db.read() as session:
            outcome = session.scalar(select(t.Attempt.outcome).where(
                t.Attempt.render_id == render_id, t.Attempt.number == attempt, t.Attempt.worker == owner))
        return AttemptOutcome(outcome) if outcome else None

    def _charge_attempt(self, session: Session, owner: str, render_id: str, attempt: int, outcome: AttemptOutcome,
                        error: str | None, charges: list[Charge], device_kind: str | None, node: str | None,
                        timings: list | None) -> t.Render | None:
        """Ends a leased attempt, charging the work it did; None (nothing written) when
        the attempt no longer holds the lease."""
        row = self._leased(session, owner, {render_id}).get(render_id)
        if row is None or row.attempt != attempt:
            return None
        self._end_attempt(session, row, outcome, error, device_kind, node, timings)
        self._add_ledger(session, row, attempt, charges, charged=True)
        row.cost_nanodollars += sum(c.nanodollars for c in charges)
        return row

    def release(self, owner: str, render_id: str, attempt: int, reason: str, max_attempts: int,
                absorbed: list[Charge] = (), node: str | None = None, device_kind: str | None = None) -> bool:
        """Gives back a lease the farm could not honour (the replica died): the attempt
        is LOST, its work recorded as absorbed by the farm, not charged; the render is
        requeued with attempt + 1, or fails after max_attempts."""
        with self._db.write() as session:
            row = self._leased(session, owner, {render_id}).get(render_id)
            if row is None or row.attempt != attempt:
                return False
            self._add_ledger(session, row, attempt, absorbed, charged=False)
            self._requeue_row(session, row, reason, max_attempts, node=node, device_kind=device_kind)
            return True

    def _add_ledger(self, session: Session, row: t.Render, attempt: int, charges: Iterable[Charge],
                    charged: bool) -> None:
        for charge in charges:
            session.add(t.LedgerEntry(
                render_id=row.id, tenant_id=row.tenant_id, model=row.model, attempt=attempt, phase=charge.phase,
                device_kind=charge.device_kind, device_seconds=charge.device_seconds,
                nanodollars=charge.nanodollars, charged=charged,
            ))

    def requeue_expired(self, max_attempts: int) -> dict[str, str]:
        """Sends renders whose lease expired back to the queue (attempt + 1), or
        fails them after max_attempts. Returns their ids, each with its model."""
        now = t.utcnow()
        stmt = select(t.Render).where(
            t.Render.state == RenderState.RUNNING.value, t.Render.lease_expires_at < now
        )
        if not self._db.is_sqlite:
            stmt = stmt.with_for_update(skip_locked=True)
        with self._db.write() as session:
            rows = list(session.scalars(stmt))
            for row in rows:
                self._requeue_row(session, row, f"lease of {row.lease_owner} expired", max_attempts)
            return {row.id: row.model for row in rows}

    def _requeue_row(self, session: Session, row: t.Render, reason: str, max_attempts: int,
                     node: str | None = None, device_kind: str | None = None) -> None:
        self._end_attempt(session, row, AttemptOutcome.LOST, reason, device_kind, node, None)
        # Preemptions and retries on other nodes end attempts too; only losses count here.
        lost = session.scalar(select(func.count()).select_from(t.Attempt).where(
            t.Attempt.render_id == row.id, t.Attempt.outcome == AttemptOutcome.LOST.value))
        if row.cancel_requested:
            self._finish_row(session, row, RenderState.CANCELLED, message=f"cancelled ({reason})")
        elif lost >= max_attempts:
            row.error = f"lost {lost} times; last: {reason}"
            self._finish_row(session, row, RenderState.FAILED, message=row.error)
        else:
            self._back_to_queue(session, row, f"requeued: {reason}")

    def _end_attempt(self, session, row, outcome, error, device_kind, node, timings) -> None:
        attempt = session.scalar(
            select(t.Attempt).where(t.Attempt.render_id == row.id, t.Attempt.number == row.attempt)
        )
        if attempt is not None:
            attempt.outcome, attempt.ended_at, attempt.error = outcome.value, t.utcnow(), error
            attempt.device_kind, attempt.node = device_kind, node
            attempt.timings_json = json.dumps(timings) if timings is not None else None


def _failures_message(failures: Sequence) -> str:
    """`failed N times on K nodes: node: reason (M times); ...` from (node, error) rows."""
    counts: dict[tuple[str, str], int] = {}
    for failure in failures:
        key = (failure.node or "unknown node", failure.error or "no reason given")
        counts[key] = counts.get(key, 0) + 1
    nodes = len({node for node, _ in counts})
    reasons = "; ".join(f"{node}: {error}" + (f" ({count} times)" if count > 1 else "")
                        for (node, error), count in counts.items())
    return (f"failed {len(failures)} {'time' if len(failures) == 1 else 'times'} on {nodes} "
            f"{'node' if nodes == 1 else 'nodes'}: {reasons}")

