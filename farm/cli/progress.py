"""Progress bars that follow renders' denoising steps through WatchRender."""

from __future__ import annotations

import threading
import time

import grpc
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from farm.v1 import render_pb2 as pb

FINAL = {pb.RENDER_STATE_SUCCEEDED, pb.RENDER_STATE_FAILED, pb.RENDER_STATE_CANCELLED}
RECONNECT_DELAY_S = 1.0


def _label(event: pb.RenderEvent) -> str:
    if event.state in FINAL or event.state == pb.RENDER_STATE_QUEUED:
        return pb.RenderState.Name(event.state).removeprefix("RENDER_STATE_").lower()
    return pb.Stage.Name(event.stage).removeprefix("STAGE_").lower().replace("_", " ")


def follow_renders(client, renders: dict[str, str], console: Console, timeout_s: float = 3600) -> None:
    """One bar per render (render id -> title), filled step by step. A dropped stream
    is resumed after the last event seen, so no step is missed or repeated."""
    columns = (TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[stage]:<14}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        bars = {rid: progress.add_task(title, total=None, stage="queued") for rid, title in renders.items()}

        def follow(render_id: str) -> None:
            last_seq, deadline = 0, time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                try:
                    for event in client.watch(render_id, after_sequence=last_seq,
                                              timeout=deadline - time.monotonic()):
                        last_seq = event.sequence
                        update = {"stage": _label(event)}
                        if event.total_steps:
                            update.update(total=event.total_steps, completed=event.step)
                        progress.update(bars[render_id], **update)
                        if event.state in FINAL:
                            return
                    return
                except grpc.RpcError as error:
                    if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL):
                        raise
                    progress.update(bars[render_id], stage="reconnecting")
                    time.sleep(RECONNECT_DELAY_S)

        threads = [threading.Thread(target=follow, args=(rid,), daemon=True) for rid in renders]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
