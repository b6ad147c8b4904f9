"""Model traceability: a content hash of every model a pipeline runs, and a registry that refuses to serve
changed model files under an unchanged version.

The fingerprint covers the pipeline's Triton model and, for an ensemble, every composing model (config.pbtxt
and all files of the version folders), so editing a detector's ONNX file or a Python step changes it. The first
fingerprint seen for (model, Triton version, algorithm version) is recorded in ``data_dir/model_registry.json``;
a later start with different files for the same versions is refused until the version is raised.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from gateway.config.settings import PipelineSettings
from gateway.core.durable import atomic_write
from gateway.core.errors import ConfigError
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
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

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
        key = f"{model}|{triton_version}|{algorithm_version}"
        known = self._load()
        previous = known.get(key)
        if previous is not None and previous != fingerprint:
            raise ConfigError(
                f"model {model!r} (Triton version {triton_version}, algorithm version {algorithm_version}) has "
                f"changed: its files hash to {fingerprint[:16]}..., but {previous[:16]}... was served under the "
                "same versions before. Raise the model or algorithm version so results stay traceable."
            )
        if previous is None:
            known[key] = fingerprint
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps(known, indent=2, sort_keys=True).encode())


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
