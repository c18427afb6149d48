"""Object storage for big payloads, through Airflow's ``ObjectStoragePath``.

So ``file://``, ``s3://conn@bucket/…``, ``gs://…`` and every other fsspec filesystem an
Airflow provider registers work as they do for Airflow's own object-storage XCom backend.
Blobs are written and read as streams of chunks, never as one buffer, and every read is
checked against the size and SHA-256 the ledger recorded when the blob was written: a
missing, truncated or altered blob is a :class:`PayloadError`, never wrong data.

A blob's name carries its creation time (``<ms>-<random>.blob``), so the orphan sweep
needs no listing metadata, which differs from one filesystem to the next.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from typing import Any

from exclusive_xcom.errors import ConfigurationError, ItemRef, PayloadError, mask_secrets
from exclusive_xcom.ledger import Offloaded

log = logging.getLogger("exclusive_xcom")

READ_CHUNK = 1 << 20
SUFFIX = ".blob"
#: The Airflow provider that registers each object-storage scheme, for the error that names it.
PROVIDERS = {
    "s3": "apache-airflow-providers-amazon",
    "s3a": "apache-airflow-providers-amazon",
    "gs": "apache-airflow-providers-google",
    "gcs": "apache-airflow-providers-google",
    "abfs": "apache-airflow-providers-microsoft-azure",
    "abfss": "apache-airflow-providers-microsoft-azure",
    "adl": "apache-airflow-providers-microsoft-azure",
}
#: Executors whose tasks all run on the scheduler's machine, so a local folder is shared.
ONE_MACHINE_EXECUTORS = frozenset({"LocalExecutor", "SequentialExecutor", "DebugExecutor"})


def default_base() -> str:
    home = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
    return f"file://{os.path.join(os.path.abspath(home), 'exclusive_xcom_offload')}"


class BlobStore:
    """Blobs under one ``ObjectStoragePath`` folder (``[exclusive_xcom] offload_path``)."""

    def __init__(self, base: str | None = None) -> None:
        from airflow.sdk import ObjectStoragePath

        self.uri = base or default_base()
        try:
            self.base: Any = ObjectStoragePath(self.uri)
        except Exception as exc:  # fsspec raises many types for an unknown scheme or bad URI
            raise ConfigurationError(f"[exclusive_xcom] offload_path {self.uri!r} is not usable: {exc}") from exc
        try:
            self.base.fs  # noqa: B018 -- made here, not at the first write: a missing provider fails now
        except ValueError as exc:  # "No filesystem registered for scheme s3"
            provider = PROVIDERS.get(self.base.protocol, "the Airflow provider that registers it")
            raise ConfigurationError(
                f"[exclusive_xcom] offload_path {self.uri!r} needs a filesystem for {self.base.protocol}://: "
                f"install {provider} on every host that runs tasks"
            ) from exc

    def write(self, folder: str, chunks: Iterable[bytes], ref: ItemRef | None = None) -> Offloaded:
        """Stream ``chunks`` into a new blob under ``folder``; returns its URI, size and digest."""
        path = self.base / folder / f"{int(time.time() * 1000)}-{uuid.uuid4().hex}{SUFFIX}"
        digest, size = hashlib.sha256(), 0
        try:
            if path.protocol == "file":
                path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
        except PayloadError:
            self.delete([str(path)])
            raise
        except Exception as exc:
            self.delete([str(path)])
            raise PayloadError(f"cannot write the payload to {path}: {exc}", ref) from exc
        return Offloaded(str(path), size, digest.hexdigest())

    def read(self, blob: Offloaded, ref: ItemRef | None = None) -> Iterator[bytes]:
        """The blob's chunks; raises :class:`PayloadError` at the end if size or digest differ."""
        from airflow.sdk import ObjectStoragePath

        digest, size = hashlib.sha256(), 0
        try:
            path: Any = ObjectStoragePath(blob.uri)  # its open() is unannotated
            with path.open("rb") as f:
                while chunk := f.read(READ_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    yield chunk
        except FileNotFoundError as exc:
            raise PayloadError(f"the offloaded payload {blob.uri} is missing (deleted or purged?)", ref) from exc
        except OSError as exc:
            raise PayloadError(f"cannot read the offloaded payload {blob.uri}: {exc}", ref) from exc
        if size != blob.size or digest.hexdigest() != blob.sha256:
            raise PayloadError(
                f"the offloaded payload {blob.uri} is corrupted: checksum mismatch ({size} bytes read, "
                f"{blob.size} written); refusing to return it",
                ref,
            )

    def delete(self, uris: Iterable[str]) -> int:
        """Delete blobs, best effort; returns how many existed and are gone now.

        A blob that stays behind (storage down) is swept by ``purge`` later.
        """
        from airflow.sdk import ObjectStoragePath

        deleted = 0
        for uri in uris:
            try:
                ObjectStoragePath(uri).unlink()
                deleted += 1
            except FileNotFoundError:  # already gone (e.g. deleted when its item was consumed)
                pass
            except Exception as exc:  # storage down: the sweep will find it
                log.warning("exclusive_xcom: could not delete offloaded payload %s: %s", uri, exc)
        return deleted

    def older_than(self, cutoff: datetime) -> Iterator[str]:
        """URIs of blobs written before ``cutoff`` (by the time in their name)."""
        if not self.base.exists():
            return
        limit_ms = cutoff.replace(tzinfo=timezone.utc).timestamp() * 1000
        for path in self.base.rglob(f"*{SUFFIX}"):
            stamp = path.name.split("-", 1)[0]
            if stamp.isdigit() and int(stamp) < limit_ms:
                yield str(path)


def not_shared(uri: str, executor: str) -> str | None:
    """Why a local ``offload_path`` may not reach every task (None: it does, or is not local).

    A blob written by a worker on one host must be readable by a consumer on another; a
    ``file://`` folder is that only when every task runs on one machine, or when the
    folder is a network mount on every host, which nothing here can check: so a warning.
    """
    executors = {name.strip().rsplit(".", 1)[-1].split(":")[-1] for name in executor.split(",") if name.strip()}
    if not uri.startswith(("file://", "local://", "/")) or executors <= ONE_MACHINE_EXECUTORS:
        return None
    return mask_secrets(
        f"[exclusive_xcom] offload_path {uri!r} is a local folder but [core] executor is {executor!r}: a payload "
        "offloaded on one host cannot be read on another unless that folder is shared storage mounted on every "
        "host; use object storage (s3://, gs://, ...)"
    )
