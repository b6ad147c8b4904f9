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
    assert head.output.labels[0].scheme == "SCT"
    assert (chest.name, chest.input.scope, chest.input.spacing) == ("ct_chest_nodule", "volume", "SPACING")
    assert (cxr.name, cxr.input.intensity, cxr.route.modalities) == (
        "cxr_opacity",
        "percentile",
        ("CR", "DX"),
    )


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


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # Strict types: nothing is converted behind the operator's back.
        ("workers = true\n", "workers: expected an integer, got True"),
        ("quiet_period_s = '3'\n", "quiet_period_s: expected a number, got '3'"),
        ("force_cpu = 1\n", "force_cpu: expected true or false, got 1"),
        ("[receiver]\nallowed_calling_aes = 'PACS'\n", "receiver.allowed_calling_aes: expected a list"),
        # Closed vocabularies are enums.
        ("[triton]\ntransport = 'carrier-pigeon'\n", "triton.transport must be auto, shared_memory or grpc"),
        ("decode_backend = 'magic'\n", "decode_backend must be auto, pydicom or nvimgcodec"),
        ("log_level = 'chatty'\n", "log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL"),
        # Ranges.
        ("[delivery]\nmax_attempts = 0\n", "delivery.max_attempts must be >= 1"),
        ("[scheduling.pacs_weights]\nMAIN = -1\n", "scheduling.pacs_weights.MAIN must be > 0"),
        ("[retention]\naudit_days = -1\n", "retention.audit_days must be >= 0"),
        # Unknown keys, with the closest known one.
        ("quiet_period = 3\n", "unknown setting(s) quiet_period (did you mean quiet_period_s?)"),
        ("[receiver]\nprot = 104\n", "receiver: unknown setting(s) prot (did you mean port?)"),
    ],
)
def test_strict_types_vocabularies_ranges_and_unknown_keys_name_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert message in str(caught.value)


_PIPELINE = (
    "[[pipelines]]\nname = 'x'\nalgorithm_version = '1'\nmodalities = ['CT']\ninput_size = [64, 64]\n"
    "[pipelines.labels]\n0 = 'nodule'\n"
)


def test_a_pipeline_table_stays_flat_and_its_errors_name_the_flat_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        _PIPELINE.replace(
            "input_size", "report_threshold = 1.5\ninput_layout = 'NCWH'\ninput_sise = 3\ninput_size"
        )
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    text = str(caught.value)
    # Every problem at once, each under the key the operator wrote (the model groups them internally).
    assert "pipelines[0].report_threshold must be <= 1" in text
    assert "pipelines[0].input_layout must be NHW, NCHW or NHWC" in text
    assert "pipelines[0]: unknown setting(s) input_sise (did you mean input_size?)" in text


def test_a_pipeline_splits_into_routing_rule_input_output_and_provenance(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text(_PIPELINE)
    [pipeline] = load_settings(config).pipelines
    assert pipeline.route.modalities == ("CT",)
    assert pipeline.input.size == (64, 64) and pipeline.input.layout == "NHW"
    assert pipeline.output.labels[0].meaning and pipeline.output.report_threshold == 0.5
    # The model and algorithm name default to the pipeline's name.
    assert (pipeline.provenance.model, pipeline.provenance.algorithm_name) == ("x", "x")
    assert pipeline.model == "x"
    # A changed copy is validated like the file.
    assert pipeline.replace(report_threshold=0.25).output.report_threshold == 0.25
    with pytest.raises(ValueError, match="report_threshold"):
        pipeline.replace(report_threshold=2.0)


def test_cross_field_rules_are_checked(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(_PIPELINE.replace("input_size", "intensity = 'window'\ninput_size"))
    with pytest.raises(ConfigError, match="needs window = \\[center, width\\]"):
        load_settings(config)
    config.write_text("quiet_period_s = 20\nincomplete_guard_s = 10\n")
    with pytest.raises(ConfigError, match=r"incomplete_guard_s .* must be >= quiet_period_s"):
        load_settings(config)
    config.write_text(_PIPELINE + _PIPELINE)
    with pytest.raises(ConfigError, match="pipeline names must be unique"):
        load_settings(config)


def test_the_embedded_defaults_file_and_the_models_defaults_agree(tmp_path: Path) -> None:
    from gateway.config.settings import Settings

    from_file = load_settings(overrides={"data_dir": str(tmp_path)}).model_dump(
        exclude={"pipelines", "peers"}
    )
    from_models = Settings(data_dir=tmp_path).model_dump(exclude={"pipelines", "peers"})
    assert from_file == from_models


def test_a_listening_port_of_zero_picks_a_free_one_but_a_peer_needs_a_real_port(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text("[http]\nport = 0\n")
    assert load_settings(config).http.port == 0
    config.write_text("[[peers]]\nae_title = 'PACS'\nport = 0\n")
    with pytest.raises(ConfigError, match=r"peers\[0\]\.port must be 1-65535"):
        load_settings(config)


def test_the_database_url_comes_from_the_environment_when_the_settings_leave_it_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.config.settings import DATABASE_URL_ENV

    monkeypatch.setenv(DATABASE_URL_ENV, "postgresql://gw:pw@127.0.0.1:5432/gateway")
    assert load_settings(overrides={"data_dir": str(tmp_path)}).database_url.startswith("postgresql://")
    named = load_settings(overrides={"data_dir": str(tmp_path), "database": {"url": "sqlite:////x/g.db"}})
    assert named.database_url == "sqlite:////x/g.db"  # the settings file wins
    monkeypatch.delenv(DATABASE_URL_ENV)
    assert (
        load_settings(overrides={"data_dir": str(tmp_path)}).database_url
        == f"sqlite:///{tmp_path}/gateway.db"
    )
    with pytest.raises(ConfigError, match=r"database\.url must be sqlite"):
        load_settings(overrides={"data_dir": str(tmp_path), "database": {"url": "mysql://a@b/c"}})
