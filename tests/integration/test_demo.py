"""`gateway demo` against a running gateway with the embedded reference pipelines (issue 16, item 5): one
synthetic study per pipeline is sent, analysed, its findings printed, and each key image drawn with the AI's
boxes as a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gateway.app import Gateway
from gateway.cli import main
from gateway.config.settings import load_settings
from gateway.inference.server import free_port

pytestmark = pytest.mark.integration


def test_the_demo_shows_every_reference_pipeline(
    tmp_path: Path, triton: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\nquiet_period_s = 1.0\nworkers = 2\n[http]\nport = {free_port()}\n'
        f'[receiver]\nport = {free_port()}\n[triton]\nurl = "{triton}"\n'
    )
    assert main(["demo", "--config", str(config)]) == 2  # no gateway running: a clear error
    assert "start it first" in capsys.readouterr().err
    gateway = Gateway(load_settings(config)).start()
    try:
        assert main(["demo", "--config", str(config), "--out", str(tmp_path / "studies")]) == 0
    finally:
        gateway.stop()
    printed = capsys.readouterr().out
    print(printed)
    for pipeline, finding in (
        ("ct_head_hyperdensity", "Hemorrhage"),
        ("ct_chest_nodule", "Nodule"),
        ("cxr_opacity", "Opacity"),
    ):
        section = printed.split(f"\n{pipeline} (mode ")[1].split("\n\n")[0]
        assert finding in section, section
        picture = tmp_path / "data" / "demo" / f"{pipeline}.png"
        assert f"key image with the AI's boxes: {picture}" in section
        pixels = np.asarray(Image.open(picture).convert("RGB")).astype(int)
        red = (pixels[..., 0] > 200) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
        assert red.sum() > 50, f"no box drawn on {picture}"  # the outline, not just a loaded image
