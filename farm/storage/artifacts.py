"""Artifacts (MP4s and their manifests) under an fsspec URL: a local directory by
default, s3:// or any other fsspec filesystem in a cluster.

Each attempt writes under its own prefix, so an attempt that lost its lease but is
still running can never overwrite the one that finished. Writes go to a temporary
name first and are renamed into place, so a reader never sees half a file.

Denoising checkpoints of preempted attempts live beside the attempts, under the
render's `checkpoints/` prefix, one per attempt: deleting an attempt's files never
deletes the checkpoint the next attempt resumes from; `delete_checkpoints` removes them
all once the render has finished."""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterator

import fsspec

log = logging.getLogger(__name__)

VIDEO_NAME = "video.mp4"
MANIFEST_NAME = "manifest.json"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_SUFFIX = ".ckpt"


class ArtifactStore:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)

    def attempt_prefix(self, render_id: str, attempt: int) -> str:
        return f"{self.root}/renders/{render_id}/attempt-{attempt}"

    def uri(self, path: str) -> str:
        return self.fs.unstrip_protocol(path)

    def write(self, render_id: str, attempt: int, video: bytes, manifest: dict) -> tuple[str, str]:
        """Writes the MP4 and its manifest; returns their URIs."""
        prefix = self.attempt_prefix(render_id, attempt)
        self.fs.makedirs(prefix, exist_ok=True)
        video_path = self._put(f"{prefix}/{VIDEO_NAME}", video)
        manifest_path = self._put(f"{prefix}/{MANIFEST_NAME}", json.dumps(manifest, indent=2, sort_keys=True).encode())
        return self.uri(video_path), self.uri(manifest_path)

    def _put(self, path: str, data: bytes) -> str:
        partial = f"{path}.partial-{secrets.token_hex(4)}"
        try:
            with self.fs.open(partial, "wb") as f:
                f.write(data)
            self.fs.mv(partial, path)
        except BaseException:
            if self.fs.exists(partial):
                self.fs.rm(partial)
            raise
        return path

    def checkpoint_prefix(self, render_id: str) -> str:
        return f"{self.root}/renders/{render_id}/{CHECKPOINTS_DIR}"

    def write_checkpoint(self, render_id: str, attempt: int, data: bytes) -> str:
        """Writes the checkpoint a preempted attempt left (temporary name, then renamed); returns its URI."""
        prefix = self.checkpoint_prefix(render_id)
        self.fs.makedirs(prefix, exist_ok=True)
        return self.uri(self._put(f"{prefix}/attempt-{attempt}{CHECKPOINT_SUFFIX}", data))

    def read_checkpoint(self, uri: str) -> bytes:
        """The bytes `write_checkpoint` wrote; FileNotFoundError when it is gone."""
        fs, path = fsspec.core.url_to_fs(uri)
        return fs.cat_file(path)

    def delete_checkpoints(self, render_id: str) -> None:
        """Removes every checkpoint of a render (when it has finished, one way or another)."""
        prefix = self.checkpoint_prefix(render_id)
        if self.fs.exists(prefix):
            self.fs.rm(prefix, recursive=True)

    def discard_checkpoints(self, render_id: str) -> None:
        """`delete_checkpoints` for a render that has ended, logging a failure instead of
        raising: a file left behind costs storage, not correctness."""
        try:
            self.delete_checkpoints(render_id)
        except Exception:
            log.exception("could not delete the checkpoints of %s", render_id)

    def delete_attempt(self, render_id: str, attempt: int) -> None:
        prefix = self.attempt_prefix(render_id, attempt)
        if self.fs.exists(prefix):
            self.fs.rm(prefix, recursive=True)

    def size(self, uri: str) -> int:
        fs, path = fsspec.core.url_to_fs(uri)
        return fs.size(path)

    def read_chunks(self, uri: str, chunk_bytes: int, offset: int = 0) -> Iterator[tuple[int, bytes]]:
        fs, path = fsspec.core.url_to_fs(uri)
        with fs.open(path, "rb") as f:
            f.seek(offset)
            while chunk := f.read(chunk_bytes):
                yield offset, chunk
                offset += len(chunk)
