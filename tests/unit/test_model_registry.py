"""Traceability: model content hashes, and refusal of changed model files under an unchanged version."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.config.settings import default_model_repository, load_settings
from gateway.core.errors import ConfigError
from gateway.inference.registry import ModelRegistry, composing_models, local_model_version, model_fingerprint
from gateway.inference.server import free_port

ENSEMBLE = "ct_head_hyperdensity"


@pytest.fixture
def repository(tmp_path: Path, model_repository: Path) -> Path:
    copy = tmp_path / "repo"
    shutil.copytree(model_repository, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_fingerprint_covers_every_composing_model(repository: Path) -> None:
    assert composing_models(repository, ENSEMBLE) == [
        ENSEMBLE,
        f"{ENSEMBLE}_detector",
        f"{ENSEMBLE}_postprocess",
        f"{ENSEMBLE}_preprocess",
    ]
    assert model_fingerprint(repository, ENSEMBLE) == model_fingerprint(default_model_repository(), ENSEMBLE)
    before = model_fingerprint(repository, ENSEMBLE)
    onnx = repository / f"{ENSEMBLE}_detector" / "1" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    assert model_fingerprint(repository, ENSEMBLE) != before
    assert local_model_version(repository, ENSEMBLE) == "1"


def test_fingerprint_covers_the_shared_step_code_the_ensemble_runs(repository: Path) -> None:
    """The post-processing math lives in model_repository/ensemble_steps/: changing it changes what the model
    answers, so it changes the fingerprint of every ensemble whose steps import it, and of no other model."""
    before = model_fingerprint(repository, ENSEMBLE)
    standalone = model_fingerprint(repository, f"{ENSEMBLE}_detector")  # ONNX only, imports no step code
    detection = repository / "ensemble_steps" / "detection.py"
    detection.write_text(detection.read_text() + "\n# changed\n")
    assert model_fingerprint(repository, ENSEMBLE) != before
    assert model_fingerprint(repository, f"{ENSEMBLE}_detector") == standalone


def test_registry_refuses_changed_files_under_the_same_versions(repository: Path, tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry.json")
    original = model_fingerprint(repository, ENSEMBLE)
    registry.check_and_record(ENSEMBLE, "1", "0.1.0", original)
    registry.check_and_record(ENSEMBLE, "1", "0.1.0", original)  # same files again: fine
    step = repository / f"{ENSEMBLE}_postprocess" / "config.pbtxt"
    step.write_text(step.read_text().replace('"0.3"', '"0.2"'))  # a threshold edited in place
    changed = model_fingerprint(repository, ENSEMBLE)
    with pytest.raises(ConfigError, match=r"has changed.*Raise the model or algorithm version"):
        registry.check_and_record(ENSEMBLE, "1", "0.1.0", changed)
    registry.check_and_record(ENSEMBLE, "1", "0.1.1", changed)  # a new algorithm version is accepted
    assert len(json.loads((tmp_path / "registry.json").read_text())) == 2


def test_gateway_refuses_to_start_with_a_changed_model(tmp_path: Path, model_repository: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "model_registry.json").write_text(json.dumps({f"{ENSEMBLE}|1|0.1.0": "0" * 64}))
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{data}"\n[receiver]\nport = {free_port()}\n[http]\nenabled = false\n[triton]\nurl = "127.0.0.1:1"\n'
    )
    with pytest.raises(ConfigError, match="has changed"):
        Gateway(load_settings(config)).start()


def test_the_registry_in_the_database_is_shared_and_takes_in_the_old_json(
    repository: Path, tmp_path: Path, database_url: str
) -> None:
    """Two gateways on one database: what one recorded, the other must honour; a JSON registry of an earlier
    release is taken in on first use (its entry wins over the files now on disk)."""
    from gateway.database import migrate
    from gateway.database.connect import engine_for

    engine = engine_for(database_url)
    migrate.upgrade(engine)
    try:
        original = model_fingerprint(repository, ENSEMBLE)
        (tmp_path / "legacy.json").write_text(json.dumps({f"{ENSEMBLE}|1|0.0.9": "0" * 64}))
        node_a = ModelRegistry(tmp_path / "legacy.json", engine=engine, node="a")
        node_b = ModelRegistry(tmp_path / "none.json", engine=engine, node="b")
        with pytest.raises(ConfigError, match="has changed"):
            node_a.check_and_record(ENSEMBLE, "1", "0.0.9", original)  # the legacy entry, now in the table
        node_a.check_and_record(ENSEMBLE, "1", "0.1.0", original)
        node_b.check_and_record(ENSEMBLE, "1", "0.1.0", original)  # the same files on another node: fine
        with pytest.raises(ConfigError, match="has changed"):
            node_b.check_and_record(ENSEMBLE, "1", "0.1.0", "f" * 64)  # other files under node a's versions
    finally:
        engine.dispose()
