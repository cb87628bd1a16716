"""One typed settings object, read from arguments, ``TUNEWATCH_*`` variables or a TOML file."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from monitor.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

ENV_PREFIX = "TUNEWATCH_"
DEFAULT_DATABASE_URL = "sqlite:///tunewatch.db"
DRIFT_CORRECTIONS = ("fdr_bh", "bonferroni", "none")  # monitor.drift implements them


def _rate(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"setting {name}={value!r} is out of range: use a share between 0 and 1")


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"setting {name}={value!r} must be greater than 0")


@dataclass(frozen=True)
class Settings:
    """Every knob of tunewatch, validated on creation.

    >>> Settings(sample_rate=0.5).sample_rate
    0.5
    >>> Settings(sample_rate=2)
    Traceback (most recent call last):
    ...
    monitor.errors.ConfigError: setting sample_rate=2 is out of range: use a share between 0 and 1
    >>> Settings(latency_tolerance=10)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    monitor.errors.ConfigError: setting latency_tolerance=10 must be a fraction below 10 ...
    """

    database_url: str = DEFAULT_DATABASE_URL
    # Data plane: what each wrapped call records.
    span_sample_rate: float = 0.01
    sample_rate: float = 0.05
    sample_cap_per_minute: int = 600
    raw_max_values: int = 4096  # accepted for old configs; raw rows now obey the two below
    raw_row_max_bytes: int = 8 << 20  # a sampled row's raw arrays are kept up to this size
    raw_reservoir_mb: float = 256.0  # raw bytes kept per model version; the oldest are cleared
    tabular_max_columns: int = 64
    queue_size: int = 250_000
    buffer_rows: int = 100_000
    flush_interval_s: float = 1.0
    aggregate_interval_s: int = 10
    retry_max_backoff_s: float = 5.0
    default_arm: str = "main"
    # Detection.
    latency_recent_s: int = 900
    latency_baseline_s: int = 86_400
    latency_baseline_start: str = ""
    latency_baseline_end: str = ""
    latency_tolerance: float = 0.10
    latency_alpha: float = 0.05
    latency_min_samples: int = 50
    drift_reference_rows: int = 500
    drift_current_s: int = 3600
    drift_reference_start: str = ""
    drift_reference_end: str = ""
    drift_max_rows: int = 5000
    drift_min_rows: int = 30
    drift_alpha: float = 0.05
    drift_correction: str = "fdr_bh"
    retune_on: str = "latency_regression,data_drift,fidelity_drop,performance_drop"
    # Realized performance (labels joined to predictions): recent window vs reference window.
    performance_recent_s: int = 3600
    performance_reference_s: int = 86_400
    performance_reference_start: str = ""
    performance_reference_end: str = ""
    performance_tolerance: float = 0.03  # accuracy points, or a fraction of the reference MAE
    performance_alpha: float = 0.05
    performance_min_labels: int = 100  # labelled predictions each window needs for a verdict
    performance_job_interval_s: int = 900
    # Fidelity to the source: raw rows replayed per check.
    fidelity_rows: int = 256
    # Scheduler.
    latency_job_interval_s: int = 300
    drift_job_interval_s: int = 3600
    retune_job_interval_s: int = 600
    analysis_job_interval_s: int = 60
    fidelity_job_interval_s: int = 900
    # Experiments and promotions.
    experiment_min_samples: int = 200
    experiment_max_duration_s: int = 86_400
    experiment_latency_tolerance: float = 0.10
    experiment_improvement_margin: float = 0.0
    experiment_min_agreement: float = 0.98
    experiment_alpha: float = 0.05
    promotion_watch_s: int = 1800
    tune_slo_ms: float = 50.0
    tune_objective: str = "throughput"
    tune_quick: bool = False
    extra_jobs: str = ""  # "id=module:function@seconds;..." user jobs run like the built-in ones
    # Retention (`tunewatch db prune`, the `retention` job): ages in days, 0 keeps forever.
    retention_raw_days: float = 14.0  # raw input arrays of samples (the summary row stays)
    retention_samples_days: float = 30.0
    retention_spans_days: float = 7.0
    retention_job_runs_days: float = 30.0
    samples_thin_after_days: float = 0.5  # older samples thinned to samples_thin_per_minute
    samples_thin_per_minute: int = 5  # per model version and arm
    rollup_minute_after_days: float = 2.0  # latency aggregates merged into 1-minute rows
    rollup_hour_after_days: float = 30.0  # and into 1-hour rows
    retention_batch_rows: int = 2000  # rows per delete/update transaction
    retention_job_interval_s: int = 3600
    # Control plane.
    artifacts_dir: str = "artifacts"
    webhook_url: str = ""
    api_token: str = field(default="", repr=False)
    api_auth_disabled: bool = False
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    api_max_body_bytes: int = 1_000_000  # larger request bodies get 413 before they are read
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in (
            "span_sample_rate", "sample_rate", "latency_alpha", "drift_alpha",
            "experiment_min_agreement", "experiment_alpha", "performance_alpha",
        ):  # fmt: skip
            _rate(name, getattr(self, name))
        for name in (
            "queue_size", "buffer_rows", "flush_interval_s", "aggregate_interval_s",
            "latency_recent_s", "latency_baseline_s", "latency_min_samples",
            "drift_reference_rows", "drift_current_s", "drift_max_rows", "drift_min_rows",
            "latency_job_interval_s", "drift_job_interval_s", "retune_job_interval_s",
            "analysis_job_interval_s", "experiment_min_samples", "experiment_max_duration_s",
            "promotion_watch_s", "api_max_body_bytes",
            "tune_slo_ms", "fidelity_rows", "fidelity_job_interval_s",
            "performance_recent_s", "performance_reference_s", "performance_min_labels",
            "performance_job_interval_s",
        ):  # fmt: skip
            _positive(name, getattr(self, name))
        for name in ("sample_cap_per_minute", "raw_max_values", "tabular_max_columns",
                     "raw_row_max_bytes", "raw_reservoir_mb"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ConfigError(f"setting {name}={getattr(self, name)!r} must be 0 or more")
        for name in ("retention_raw_days", "retention_samples_days", "retention_spans_days",
                     "retention_job_runs_days", "samples_thin_after_days",
                     "samples_thin_per_minute", "rollup_minute_after_days",
                     "rollup_hour_after_days"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"setting {name}={getattr(self, name)!r} must be >= 0 (0 keeps forever)"
                )
        _positive("retention_batch_rows", self.retention_batch_rows)
        _positive("retention_job_interval_s", self.retention_job_interval_s)
        if self.retry_max_backoff_s < 0:
            raise ConfigError(f"setting retry_max_backoff_s={self.retry_max_backoff_s!r} < 0")
        if self.drift_correction not in DRIFT_CORRECTIONS:
            raise ConfigError(
                f"setting drift_correction={self.drift_correction!r} must be one of "
                f"{', '.join(map(repr, DRIFT_CORRECTIONS))}"
            )
        for name in ("latency_tolerance", "experiment_latency_tolerance",
                     "experiment_improvement_margin", "performance_tolerance"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ConfigError(f"setting {name}={getattr(self, name)!r} must be >= 0")
        for name in ("latency_tolerance", "experiment_latency_tolerance"):
            if getattr(self, name) >= 10:  # the statistics refuse it later, in a job
                raise ConfigError(
                    f"setting {name}={getattr(self, name)!r} must be a fraction below 10 "
                    "(0.10 = 10 % slower)"
                )
        if not self.database_url:
            raise ConfigError("setting database_url is empty: pass a SQLAlchemy URL")

    def replace(self, **changes: Any) -> Settings:
        """Return a copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **_coerce_all(changes))

    @classmethod
    def load(
        cls,
        overrides: Mapping[str, Any] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        toml_path: str | Path | None = None,
    ) -> Settings:
        """Build settings: defaults < TOML file < ``TUNEWATCH_*`` environment < ``overrides``.

        The TOML file is ``toml_path``, else ``$TUNEWATCH_CONFIG`` when set.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        path = toml_path or env.get(ENV_PREFIX + "CONFIG")
        if path:
            values.update(_read_toml(Path(path)))
        values.update(_from_env(env))
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls(**_coerce_all(values))


_FIELDS = {f.name: f for f in fields(Settings) if f.name != "extra"}


def _coerce(name: str, value: Any) -> Any:
    if name not in _FIELDS:
        raise ConfigError(f"unknown setting {name!r}: valid settings are {sorted(_FIELDS)}")
    kind: type = type(_FIELDS[name].default)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    try:
        if kind is bool:
            return str(value).strip().lower() in ("1", "true", "yes", "on")
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"setting {name}={value!r} is not a valid {kind.__name__}") from None


def _coerce_all(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _coerce(k, v) for k, v in values.items()}


def _from_env(env: Mapping[str, str]) -> dict[str, str]:
    out = {}
    for name in _FIELDS:
        key = ENV_PREFIX + name.upper()
        if key in env and env[key] != "":
            out[name] = env[key]
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    section = data.get("tunewatch", data)
    return dict(section)
