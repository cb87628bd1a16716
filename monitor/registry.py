"""Read-only view of the model registry, for the serving side (``tuner`` writes it)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from monitor import schema
from monitor.errors import ArtifactMismatch, NotFound
from monitor.storage import Database, as_utc

STATUSES = ("candidate", "champion", "retired", "rejected")


@dataclass(frozen=True)
class VersionInfo:
    """A registered model version."""

    model: str
    version: str
    format: str
    artifact_path: str
    sha256: str
    parent_version: str | None
    config: dict[str, Any]
    status: str
    metrics: dict[str, Any]
    created_at: datetime
    # The version a user registered and this one derives from (itself when registered).
    source_version: str | None = None

    @property
    def source(self) -> str:
        """The source version's name (this version's own name for a registered version)."""
        return self.source_version or self.version

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON form (``artifact`` is the artifact's path)."""
        return {
            "model": self.model, "version": self.version, "format": self.format,
            "artifact": self.artifact_path, "sha256": self.sha256,
            "parent_version": self.parent_version, "source_version": self.source,
            "config": self.config,
            "status": self.status, "metrics": self.metrics,
            "created_at": self.created_at.isoformat(),
        }  # fmt: skip


def version_info(row: schema.ModelVersion) -> VersionInfo:
    """Plain dataclass of an ORM row."""
    return VersionInfo(
        row.model, row.version, row.format, row.artifact_path, row.sha256, row.parent_version,
        dict(row.config), row.status, dict(row.metrics), as_utc(row.created_at),
        row.source_version,
    )  # fmt: skip


def list_versions(db: Database, model: str | None = None) -> list[VersionInfo]:
    """Registered versions, by model and age."""
    t = schema.ModelVersion
    stmt = select(t).order_by(t.model, t.id)
    if model is not None:
        stmt = stmt.where(t.model == model)
    with db.session() as s:
        return [version_info(r) for r in s.scalars(stmt)]


def get_version(db: Database, model: str, version: str) -> VersionInfo:
    """One registered version.

    Raises:
        NotFound: the model has no such version.
    """
    t = schema.ModelVersion
    with db.session() as s:
        row = s.scalars(select(t).where(t.model == model, t.version == version)).first()
        if row is None:
            raise NotFound(
                f"model {model!r} has no registered version {version!r}: see `tunewatch models`"
            )
        return version_info(row)


def source_of(db: Database, info: VersionInfo) -> VersionInfo:
    """The registered version that ``info`` derives from (``info`` itself when registered)."""
    if info.source == info.version:
        return info
    return get_version(db, info.model, info.source)


def champion(db: Database, model: str) -> VersionInfo:
    """The version that serves a model's traffic.

    Raises:
        NotFound: the model is not registered (or has no champion).
    """
    t = schema.ModelVersion
    with db.session() as s:
        row = s.scalars(select(t).where(t.model == model, t.status == "champion")).first()
        if row is None:
            raise NotFound(
                f"model {model!r} has no champion: register it with `tunewatch register "
                f"{model} --onnx PATH`"
            )
        return version_info(row)


@dataclass(frozen=True)
class Routing:
    """What a deployment serves: the champion and, during an experiment, a challenger."""

    model: str
    champion: VersionInfo
    challenger: VersionInfo | None
    share: float
    shadow: bool
    experiment_id: int | None

    @property
    def signature(self) -> tuple[Any, ...]:
        """Changes whenever the routing must change (used to skip needless reloads)."""
        c = self.challenger
        return (self.champion.version, self.champion.sha256, c.version if c else None,
                c.sha256 if c else None, self.share, self.shadow, self.experiment_id)  # fmt: skip


def routing(db: Database, model: str) -> Routing:
    """The current routing of ``model`` from the registry and its live experiment."""
    champ = champion(db, model)
    t = schema.Experiment
    with db.session() as s:
        exp = s.scalars(
            select(t).where(t.model == model, t.status.in_(("running", "promotion_pending")))
        ).first()
        exp_data = (exp.id, exp.challenger_version, exp.share, exp.shadow) if exp else None
    if exp_data is None:
        return Routing(model, champ, None, 0.0, False, None)
    exp_id, challenger_version, share, shadow = exp_data
    challenger = get_version(db, model, challenger_version)
    return Routing(model, champ, challenger, share, shadow, exp_id)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, streamed in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_artifact(info: VersionInfo) -> Path:
    """The artifact's path once its sha256 matches the registry.

    Loading it again by path can load a file swapped since the check: to load the artifact,
    use :func:`read_verified`, which checks and returns the same bytes.

    Raises:
        ArtifactMismatch: the file is missing, corrupted or swapped.
    """
    path = Path(info.artifact_path)
    if not path.is_file():
        raise ArtifactMismatch(f"artifact of {info.model}:{info.version} is missing: {path}")
    _check_digest(info, path, file_sha256(path))
    return path


def read_verified(info: VersionInfo) -> bytes:
    """The artifact's bytes, read once and returned only if their sha256 matches the registry.

    Build the model from these bytes (``ort.InferenceSession(data, ...)``), never from the path
    again: a file swapped after this read is never loaded.

    Raises:
        ArtifactMismatch: the file is missing, corrupted or swapped.
    """
    path = Path(info.artifact_path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ArtifactMismatch(
            f"artifact of {info.model}:{info.version} is missing or unreadable: {path} "
            f"({exc.strerror or exc})"
        ) from None
    _check_digest(info, path, hashlib.sha256(data).hexdigest())
    return data


def _check_digest(info: VersionInfo, path: Path, actual: str) -> None:
    if actual != info.sha256:
        raise ArtifactMismatch(
            f"artifact of {info.model}:{info.version} at {str(path)!r} is corrupted or was "
            f"swapped: sha256 {actual[:12]}... != registered {info.sha256[:12]}...; it will "
            "not be loaded or promoted. Re-register the model from a trusted file."
        )
