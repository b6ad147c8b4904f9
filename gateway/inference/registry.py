"""Model traceability: a content hash of every model a pipeline runs, and a registry that refuses to serve
changed model files under an unchanged version.

The fingerprint covers the pipeline's Triton model and, for an ensemble, every composing model (config.pbtxt
and all files of the version folders), so editing a detector's ONNX file or a Python step changes it. The first
fingerprint seen for (model, Triton version, algorithm version) is recorded in the system of record (shared by
every gateway on one database; ``data_dir/model_registry.json`` of earlier releases is taken in); a later start
with different files for the same versions is refused until the version is raised.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import Engine, select

from gateway.config.settings import PipelineSettings
from gateway.core.durable import atomic_write
from gateway.core.errors import ConfigError
from gateway.database.connect import upsert
from gateway.database.schema import models
from gateway.inference.model_config import ensemble_step_models, read_model_config

logger = logging.getLogger(__name__)


def composing_models(repository: Path, model: str) -> list[str]:
    """The model and, recursively, the models its ensemble steps name (sorted, without duplicates)."""
    seen: set[str] = set()
    pending = [model]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        if not (repository / name / "config.pbtxt").is_file():
            raise ConfigError(f"model {name!r} has no config.pbtxt in {repository}")
        seen.add(name)
        pending.extend(ensemble_step_models(read_model_config(repository / name)))
    return sorted(seen)


SHARED_STEPS = "ensemble_steps"  # the repository's package of Python-backend step code (not a model folder)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def model_fingerprint(repository: Path, model: str) -> str:
    """SHA-256 over the names and contents of every file of the model and its composing models, and of the
    repository's shared step package when a composing model's code imports it (the step math lives there)."""
    digest = hashlib.sha256()
    files: list[Path] = []
    for name in composing_models(repository, model):
        files += _files(repository / name)
    shared = repository / SHARED_STEPS
    if shared.is_dir() and any(
        SHARED_STEPS in p.read_text(errors="replace") for p in files if p.suffix == ".py"
    ):
        files += _files(shared)
    for path in files:
        digest.update(str(path.relative_to(repository)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


class ModelRegistry:
    """The first fingerprint seen for (model, Triton version, algorithm version). In the system of record's
    ``models`` table when an engine is given - shared by every gateway on the database, so two nodes can never
    serve different files under one version - else in a JSON file. A JSON registry of an earlier release is
    taken into the table on first use."""

    def __init__(self, path: Path, *, engine: Engine | None = None, node: str = "") -> None:
        self.path = Path(path)
        self.engine = engine
        self.node = node
        self._imported = False

    def _load(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
            return {str(k): str(v) for k, v in data.items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def check_and_record(
        self, model: str, triton_version: str, algorithm_version: str, fingerprint: str
    ) -> None:
        """Record the fingerprint of these versions, or refuse when the same versions had other files."""
        key = (model, triton_version, algorithm_version)
        previous = self._recorded(key, fingerprint)
        if previous != fingerprint:
            raise ConfigError(
                f"model {model!r} (Triton version {triton_version}, algorithm version {algorithm_version}) has "
                f"changed: its files hash to {fingerprint[:16]}..., but {previous[:16]}... was served under the "
                "same versions before. Raise the model or algorithm version so results stay traceable."
            )

    def _recorded(self, key: tuple[str, str, str], fingerprint: str) -> str:
        """The fingerprint on record for ``key``, recording ``fingerprint`` when there is none."""
        if self.engine is None:
            known, name = self._load(), "|".join(key)
            if name not in known:
                known[name] = fingerprint
                self.path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(self.path, json.dumps(known, indent=2, sort_keys=True).encode())
            return known[name]
        if not self._imported:
            for legacy, sha in self._load().items():
                parts = legacy.split("|")
                if len(parts) == 3:
                    self._insert(tuple(parts), sha)  # type: ignore[arg-type]
            self._imported = True
        self._insert(key, fingerprint)  # a no-op when any fingerprint is on record (first one wins)
        with self.engine.connect() as connection:
            m = models.c
            found = connection.execute(
                select(m.sha256).where(
                    m.model == key[0], m.triton_version == key[1], m.algorithm_version == key[2]
                )
            ).scalar_one()
        return str(found)

    def _insert(self, key: tuple[str, str, str], fingerprint: str) -> None:
        assert self.engine is not None
        with self.engine.begin() as connection:
            connection.execute(
                upsert(connection, models)
                .values(
                    model=key[0],
                    triton_version=key[1],
                    algorithm_version=key[2],
                    sha256=fingerprint,
                    first_seen_at=time.time(),
                    node=self.node,
                )
                .on_conflict_do_nothing()
            )


def local_model_version(repository: Path, model: str) -> str:
    """The highest numeric version folder of a model (what Triton serves by default)."""
    versions = [int(p.name) for p in (repository / model).iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        raise ConfigError(f"model {model!r} in {repository} has no version folder")
    return str(max(versions))


def fingerprint_models(
    repository: Path, pipelines: Sequence[PipelineSettings], registry: ModelRegistry
) -> dict[str, str]:
    """Hash every pipeline's model files and refuse changed files under unchanged versions (traceability);
    returns model -> fingerprint (a model missing from ``repository`` is logged and left out)."""
    hashes: dict[str, str] = {}
    for pipeline in pipelines:
        if not (repository / pipeline.model / "config.pbtxt").is_file():
            logger.warning(
                "model %s is not in %s: its results carry no content hash", pipeline.model, repository
            )
            continue
        fingerprint = model_fingerprint(repository, pipeline.model)
        version = local_model_version(repository, pipeline.model)
        registry.check_and_record(pipeline.model, version, pipeline.provenance.algorithm_version, fingerprint)
        hashes[pipeline.model] = fingerprint
        logger.info(
            "model %s version %s (algorithm %s) sha256 %s",
            pipeline.model,
            version,
            pipeline.provenance.algorithm_version,
            fingerprint,
        )
    return hashes
