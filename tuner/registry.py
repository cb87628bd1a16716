"""The model registry: versions, artifacts verified by sha256, lineage, configs and status.

Artifacts are copied under ``artifacts_dir/<model>/<version>/``; every load checks the file's
sha256 against the registry, so a corrupted or swapped file is refused (and can never be
promoted). torch weights are stored as a state dict and read back only with
``torch.load(..., weights_only=True)``; nothing is ever unpickled.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from monitor import schema
from monitor.errors import ArtifactMismatch, StorageError
from monitor.registry import (
    STATUSES,
    VersionInfo,
    champion,
    file_sha256,
    get_version,
    list_versions,
    read_verified,
    verify_artifact,
    version_info,
)
from monitor.settings import Settings
from monitor.storage import Database, utcnow
from tuner.errors import ArtifactError, Conflict, TunerError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")

__all__ = [
    "champion",
    "get_version",
    "list_versions",
    "register",
    "set_status",
    "verified_artifact",
    "verified_bytes",
]


def _check_name(what: str, value: str) -> None:
    if not _NAME.match(value):
        raise TunerError(
            f"{what} {value!r} is invalid: use letters, digits, '.', '_' or '-' (max 200)"
        )


def sha256_of(path: Path) -> str:
    """The sha256 of a file, streamed."""
    return file_sha256(path)


def register(
    name: str,
    onnx: str | Path | None = None,
    *,
    version: str | None = None,
    torch_module: Any = None,
    example_input: Any = None,
    parent_version: str | None = None,
    config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    status: str | None = None,
    task: str = "auto",
    policy: dict[str, Any] | None = None,
    db: Database | None = None,
    settings: Settings | None = None,
) -> VersionInfo:
    """Register a model version from an ONNX file or a torch module (exported to ONNX).

    The first version of a model becomes its champion; later ones are candidates.

    Raises:
        ArtifactError: the ONNX file is missing or not a valid model.
        Conflict: the version is already registered.
    """
    settings = settings or Settings.load()
    own_db = db is None
    db = db or Database(settings.database_url)
    try:
        return _register(
            db, settings, name, onnx, version, torch_module, example_input, parent_version,
            config or {}, metrics or {}, status, task, policy,
        )  # fmt: skip
    finally:
        if own_db:
            db.dispose()


def _register(
    db: Database, settings: Settings, name: str, onnx: str | Path | None, version: str | None,
    torch_module: Any, example_input: Any, parent: str | None, config: dict[str, Any],
    metrics: dict[str, Any], status: str | None, task: str, policy: dict[str, Any] | None,
) -> VersionInfo:  # fmt: skip
    _check_name("model name", name)
    version = version or _next_version(db, name)
    _check_name("version", version)
    if status is not None and status not in STATUSES:
        raise TunerError(f"status {status!r} is not one of {STATUSES}")
    if torch_module is None and onnx is None:
        raise TunerError("register needs an ONNX file (--onnx PATH) or a torch module")
    target = Path(settings.artifacts_dir).resolve() / name / version
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        target.mkdir()  # exclusive: of two registrations of one version, one gets here
    except FileExistsError:
        raise Conflict(
            f"model {name!r} version {version!r} already has an artifact directory at {target}"
        ) from None
    artifact = target / "model.onnx"
    config = dict(config)
    try:
        if torch_module is not None:
            config.update(_store_torch(torch_module, example_input, target))
        else:
            _copy_onnx(Path(onnx), artifact)  # type: ignore[arg-type]
        return _insert(db, name, version, artifact, parent, config, metrics, status, task, policy)
    except BaseException:
        # Nothing registered: leave no artifact behind to block this version for good.
        shutil.rmtree(target, ignore_errors=True)
        raise


def _copy_onnx(source: Path, artifact: Path) -> None:
    import onnx

    if not source.is_file():
        raise ArtifactError(f"ONNX file {str(source)!r} does not exist")
    try:
        onnx.checker.check_model(str(source))
        # Weights stored beside the graph (external data) are pulled in and saved inside the
        # one artifact file, so its sha256 covers them and nothing points at the old name.
        proto = onnx.load(str(source))
        onnx.save(proto, str(artifact))
    except Exception as exc:
        raise ArtifactError(
            f"{str(source)!r} is not a valid ONNX model that fits in one file (< 2 GB): {exc}"
        ) from None


def _store_torch(module: Any, example_input: Any, target: Path) -> dict[str, Any]:
    import torch

    from tuner.onnx_tools import export_onnx

    if example_input is None:
        raise TunerError("registering a torch module needs example_input (one batch of inputs)")
    feeds = example_input if isinstance(example_input, dict) else {"input": example_input}
    export_onnx(module, feeds, target / "model.onnx")
    weights = target / "weights.pt"
    torch.save(module.state_dict(), weights)
    return {
        "source": "torch",
        "torch_class": f"{type(module).__module__}:{type(module).__qualname__}",
        "torch_weights": str(weights),
        "torch_weights_sha256": sha256_of(weights),
    }


def _source_version(s: Any, name: str, version: str, parent: str | None) -> str:
    """A derived version shares its parent's source; a registered one is its own source."""
    if parent is None:
        return version
    mv = schema.ModelVersion
    row = s.scalars(select(mv).where(mv.model == name, mv.version == parent)).first()
    if row is None:
        raise TunerError(
            f"parent version {parent!r} of {name}:{version} is not registered: see "
            "`tunewatch models`"
        )
    return str(row.source_version or row.version)


def _next_version(db: Database, name: str) -> str:
    t = schema.ModelVersion
    with db.session() as s:
        n = s.scalar(select(func.count()).select_from(t).where(t.model == name)) or 0
    return f"v{n + 1}"


def _insert(
    db: Database, name: str, version: str, artifact: Path, parent: str | None,
    config: dict[str, Any], metrics: dict[str, Any], status: str | None, task: str,
    policy: dict[str, Any] | None,
) -> VersionInfo:  # fmt: skip
    now = utcnow()
    try:
        with db.session() as s:
            model = s.scalars(select(schema.RegisteredModel).where(
                schema.RegisteredModel.name == name)).first()  # fmt: skip
            if model is None:
                s.add(schema.RegisteredModel(name=name, task=task, policy=policy or {},
                                             created_at=now))  # fmt: skip
            elif policy is not None:
                model.policy = policy
            mv = schema.ModelVersion
            has_champion = s.scalars(
                select(mv.id).where(mv.model == name, mv.status == "champion")
            ).first()
            row = schema.ModelVersion(
                model=name, version=version, format="onnx", artifact_path=str(artifact),
                sha256=sha256_of(artifact), parent_version=parent,
                source_version=_source_version(s, name, version, parent), config=config,
                status=status or ("candidate" if has_champion else "champion"),
                metrics=metrics, created_at=now, updated_at=now,
            )  # fmt: skip
            s.add(row)
            s.flush()
            return version_info(row)
    except StorageError as exc:
        if isinstance(exc.__cause__, IntegrityError):
            raise Conflict(f"model {name!r} version {version!r} is already registered") from None
        raise


def verified_artifact(info: VersionInfo) -> Path:
    """The artifact's path after checking its sha256 against the registry.

    Raises:
        ArtifactError: the file is missing or its content changed since registration.
    """
    try:
        return verify_artifact(info)
    except ArtifactMismatch as exc:
        raise ArtifactError(str(exc)) from None


def verified_bytes(info: VersionInfo) -> bytes:
    """The artifact's bytes, read once and returned only when their sha256 matches.

    Build from these bytes, never from the path again: a file swapped after the check is
    never loaded.

    Raises:
        ArtifactError: the file is missing or its content changed since registration.
    """
    try:
        return read_verified(info)
    except ArtifactMismatch as exc:
        raise ArtifactError(str(exc)) from None


def load_torch_weights(info: VersionInfo) -> dict[str, Any]:
    """The state dict saved at registration, verified and loaded with ``weights_only=True``."""
    import torch

    path = Path(info.config.get("torch_weights", ""))
    if not path.is_file() or sha256_of(path) != info.config.get("torch_weights_sha256"):
        raise ArtifactError(f"torch weights of {info.model}:{info.version} are missing or changed")
    state: dict[str, Any] = torch.load(path, weights_only=True)
    return state


def set_status(db: Database, model: str, version: str, status: str) -> VersionInfo:
    """Change a version's status (promotion uses this inside its own transaction)."""
    if status not in STATUSES:
        raise TunerError(f"status {status!r} is not one of {STATUSES}")
    t = schema.ModelVersion
    with db.session() as s:
        row = s.scalars(select(t).where(t.model == model, t.version == version)).first()
        if row is None:
            get_version(db, model, version)  # raises NotFound with the standard message
        assert row is not None
        row.status, row.updated_at = status, utcnow()
        return version_info(row)


POLICY_KEYS = {"auto_experiment": bool, "auto_approve": bool, "share": float, "shadow": bool,
               "tolerance": dict}  # fmt: skip


def set_policy(db: Database, model: str, changes: dict[str, Any], *, by: str) -> dict[str, Any]:
    """Update a model's automation policy (audited); returns the whole policy.

    Raises:
        TunerError: an unknown key or a bad value.
        NotFound: the model is not registered.
    """
    from tuner import audit
    from tuner.errors import NotFound

    for key, value in changes.items():
        kind = POLICY_KEYS.get(key)
        if kind is None or not isinstance(value, kind):
            raise TunerError(f"policy {key}={value!r} is invalid: keys are {sorted(POLICY_KEYS)}")
    if not 0.0 <= float(changes.get("share", 0.1)) <= 1.0:
        raise TunerError(f"policy share={changes['share']!r} must be between 0 and 1")
    if "tolerance" in changes:
        from tuner.guard import Tolerance

        Tolerance.from_dict(changes["tolerance"])  # refuse a bad field before storing it
    with db.session() as s:
        row = s.scalars(
            select(schema.RegisteredModel).where(schema.RegisteredModel.name == model)
        ).first()
        if row is None:
            raise NotFound(f"model {model!r} is not registered: see `tunewatch models`")
        if changes:
            row.policy = {**row.policy, **changes}
            audit.record(s, actor=by, action="policy_changed", entity="model", entity_id=row.id,
                         model=model, details=changes)  # fmt: skip
        return dict(row.policy)


def tolerance(db: Database, model: str) -> Any:
    """The accuracy guard's tolerance for ``model``: its policy's ``tolerance`` over defaults.

    One tolerance judges tuning candidates, the scheduled fidelity check and experiments alike.
    """
    from tuner.guard import Tolerance

    return Tolerance.from_dict(policy(db, model).get("tolerance") or {})


def policy(db: Database, model: str) -> dict[str, Any]:
    """A model's automation policy (empty when unset)."""
    with db.session() as s:
        row = s.scalars(
            select(schema.RegisteredModel).where(schema.RegisteredModel.name == model)
        ).first()
        return dict(row.policy) if row is not None else {}
