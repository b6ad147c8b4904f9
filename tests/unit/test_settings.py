from pathlib import Path

import pytest

from gateway.config.settings import Peer, load_settings
from gateway.core.domain import RolloutMode
from gateway.core.errors import ConfigError


def test_embedded_defaults_load_with_the_reference_pipeline() -> None:
    settings = load_settings()
    assert settings.receiver.port == 11112
    assert settings.receiver.ae_title == "AI_GATEWAY"
    assert settings.receiver.host == "127.0.0.1"
    head, chest, cxr = settings.pipelines
    assert head.name == "ct_head_hyperdensity"
    assert head.mode is RolloutMode.TRIAGE
    assert head.labels[0].scheme == "SCT"
    assert (chest.name, chest.input_scope, chest.spacing_input) == ("ct_chest_nodule", "volume", "SPACING")
    assert (cxr.name, cxr.intensity, cxr.modalities) == ("cxr_opacity", "percentile", ("CR", "DX"))


def test_file_overrides_defaults_and_flags_override_file(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text(
        'data_dir = "data"\nquiet_period_s = 3\n[receiver]\nport = 104\n'
        '[[peers]]\nae_title = "PACS1"\nhost = "127.0.0.1"\nport = 4242\n'
    )
    settings = load_settings(config, {"receiver": {"port": 11113}})
    assert settings.receiver.port == 11113
    assert settings.quiet_period_s == 3.0
    assert settings.data_dir == (tmp_path / "data").resolve()
    assert settings.allowed_calling_aes() == frozenset({"PACS1"})
    assert settings.peer_for("PACS1") == Peer(ae_title="PACS1", host="127.0.0.1", port=4242)
    # Pipelines were not redefined in the file, so the embedded ones remain.
    assert [p.name for p in settings.pipelines] == ["ct_head_hyperdensity", "ct_chest_nodule", "cxr_opacity"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[receiver]\nport = 'abc'\n", "receiver.port: expected an integer"),
        ("[receiver]\nport = 70000\n", "receiver.port must be 1-65535"),
        ("[receiver]\nae_title = 'WAY_TOO_LONG_AE_TITLE'\n", "not a valid AE title"),
        ("quiet_period_s = 0\n", "quiet_period_s must be > 0"),
        ("bogus = 1\n", "unknown setting(s) bogus"),
        ("[delivery]\ndestination = 'nohost'\n", "expected AET@host:port"),
        (
            "[[pipelines]]\nname='x'\nalgorithm_version='1'\nmodalities=['CT']\ninput_size=[256,256]\n",
            "at least one label",
        ),
        (
            "[[pipelines]]\nname='x'\nalgorithm_version='1'\nmodalities=['CT']\ninput_size=[256,256]\nmode='loud'\n",
            "mode must be silent, assist or triage",
        ),
    ],
)
def test_bad_values_fail_loudly_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings(config)


def test_invalid_toml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[receiver\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(broken)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "absent.toml")


def test_peer_parse_round_trip() -> None:
    peer = Peer.parse("ORTHANC@127.0.0.1:4242")
    assert (peer.ae_title, peer.host, peer.port) == ("ORTHANC", "127.0.0.1", 4242)
    assert str(peer) == "ORTHANC@127.0.0.1:4242"
    with pytest.raises(ConfigError):
        Peer.parse("ORTHANC@127.0.0.1")
