"""Typed settings, read once at start-up from the embedded defaults, a TOML file and command-line flags.

Precedence: command line > ``--config FILE`` > embedded ``default_config.toml``. A missing or bad value fails
loudly with a ``ConfigError`` that names the key.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from gateway.core.domain import CodedConcept, RolloutMode
from gateway.core.errors import ConfigError
from gateway.core.terminology import finding_type

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash, 1..16 chars


def _check_ae(key: str, value: str) -> str:
    value = value.strip()
    if not _AE_RE.match(value):
        raise ConfigError(f"{key}: {value!r} is not a valid AE title (1-16 printable characters, no '\\')")
    return value


@dataclass(frozen=True, kw_only=True)
class Peer:
    """A DICOM application entity the gateway talks to."""

    ae_title: str
    host: str
    port: int

    def __post_init__(self) -> None:
        _check_ae("peer ae_title", self.ae_title)
        if not 0 < self.port < 65536:
            raise ConfigError(f"peer {self.ae_title}: port must be 1-65535, got {self.port}")

    @classmethod
    def parse(cls, text: str) -> Peer:
        """Parse ``AET@host:port``."""
        match = re.match(r"^([^@]{1,16})@([^:@]+):(\d+)$", text.strip())
        if not match:
            raise ConfigError(f"expected AET@host:port, got {text!r}")
        return cls(ae_title=match.group(1), host=match.group(2), port=int(match.group(3)))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True, kw_only=True)
class ReceiverSettings:
    ae_title: str = "AI_GATEWAY"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_aes: tuple[str, ...] = ()
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    max_pdu_size: int = 0
    min_free_disk_mb: int = 512
    allowed_addresses: tuple[str, ...] = ()  # empty: any source address
    tls_cert_file: Path | None = None  # DICOM TLS when set (PEM certificate chain of the gateway)
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None  # when set, callers must present a certificate signed by this CA


@dataclass(frozen=True, kw_only=True)
class TritonSettings:
    url: str = ""
    model_repository: Path = Path("model_repository")
    startup_timeout_s: float = 120.0
    request_timeout_s: float = 60.0
    max_slices_per_request: int = 32
    retry_max_s: float = 60.0  # longest wait between inference retries while Triton is unavailable
    transport: str = "auto"  # auto (shared memory to a Triton on this host) | shared_memory | grpc
    # Cross-study batching: a request of a per-slice model is sent when it holds max_slices_per_request slices
    # (of any studies) or when its first slice has waited this long; STAT does not wait. 0: never wait.
    batch_delay_ms: float = 5.0
    cross_study_batching: bool = True


@dataclass(frozen=True, kw_only=True)
class DeliverySettings:
    destination: Peer | None = None
    timeout_s: float = 30.0
    max_attempts: int = 8  # then the job goes to the dead-letter area (gateway resend brings it back)
    retry_base_s: float = 2.0
    retry_max_s: float = 300.0


@dataclass(frozen=True, kw_only=True)
class RetentionSettings:
    """How long what the gateway keeps is kept (days; 0 keeps it for ever), and the free space a purge frees.

    Work that is not yet analysed or not yet delivered is never purged, whatever its age."""

    spool_days: float = 30.0
    results_days: float = 90.0
    audit_days: float = 365.0
    dead_letter_days: float = 30.0
    # When free space on the data disk is below this, delivered studies are purged oldest first, before their
    # age, until it is reached again (0: by age only).
    min_free_disk_mb: int = 0
    interval_s: float = 3600.0  # how often the running gateway purges


@dataclass(frozen=True, kw_only=True)
class SchedulingSettings:
    """Who gets the next inference slot: STAT before URGENT before ROUTINE; within a class, a weighted fair
    share per sending PACS (calling AE); a waiting job moves up one class (never to STAT) once it has waited
    ``promote_fraction`` of its class deadline."""

    pacs_weights: dict[str, float] = field(
        default_factory=dict
    )  # calling AE -> weight; others: default_weight
    default_weight: float = 1.0
    deadline_s: dict[str, float] = field(
        default_factory=lambda: {"STAT": 120.0, "URGENT": 600.0, "ROUTINE": 3600.0}
    )
    promote_fraction: float = 0.5
    # Workers that take only STAT jobs, on top of ``workers``: a STAT study never waits for a routine job to end.
    stat_workers: int = 1

    def weight(self, calling_ae: str) -> float:
        return self.pacs_weights.get(calling_ae, self.default_weight)


@dataclass(frozen=True, kw_only=True)
class HttpToken:
    name: str
    role: str  # read-only | operator | admin
    sha256: str  # hex digest of the bearer token; the token itself is never stored


@dataclass(frozen=True, kw_only=True)
class HttpSettings:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    tokens: tuple[HttpToken, ...] = ()


@dataclass(frozen=True, kw_only=True)
class FhirSettings:
    url: str = ""  # FHIR base URL that accepts a transaction Bundle; empty: files only
    timeout_s: float = 10.0
    attempts: int = 3


@dataclass(frozen=True, kw_only=True)
class Hl7Settings:
    endpoint: str = ""  # host:port of an MLLP listener; empty: files only
    sending_facility: str = "AI_GATEWAY"
    receiving_application: str = "RIS"
    receiving_facility: str = "HOSPITAL"
    timeout_s: float = 10.0
    attempts: int = 3

    def address(self) -> tuple[str, int] | None:
        if not self.endpoint:
            return None
        host, _, port = self.endpoint.rpartition(":")
        return host, int(port)


@dataclass(frozen=True, kw_only=True)
class PipelineSettings:
    """One AI pipeline: which series it takes, how to prepare them, and what its answers mean."""

    name: str
    model: str
    description: str
    algorithm_name: str
    algorithm_version: str
    mode: RolloutMode
    report_threshold: float
    stat_threshold: float
    modalities: tuple[str, ...]
    body_parts: tuple[str, ...]
    description_patterns: tuple[re.Pattern[str], ...]
    input_size: tuple[int, int]
    intensity: str
    hu_clip: tuple[float, float]
    window: tuple[float, float] | None
    display_window: tuple[float, float]
    labels: dict[int, CodedConcept]
    min_slices: int = 1
    # Content-aware routing: a series of a listed modality that no header rule matched is analysed when this
    # anatomy is in its field of view (decided from sampled pixels, preprocessing/anatomy.py); its findings
    # are then incidental. "" (default): header rules only. Known: "lung".
    anatomy: str = ""
    anatomy_min_fraction: float = 0.2  # of the sampled slices that must show it
    # Plausibility (gateway/orchestration/plausibility.py): where a finding may lie ("" | body | lung | intracranial, CT only)
    # and the range of its long axis in mm; findings outside are dropped with a logged reason.
    finding_anatomy: str = ""
    finding_size_mm: tuple[float, float] | None = None
    segmentation: bool = False  # the model also returns a MASK: write a DICOM SEG
    # Plug-in contract: how the model wants its input and what it answers (see README "Adding a model").
    output_kind: str = "detections"  # detections (DETECTIONS/SLICE_SCORES/STUDY_SCORE) | class_scores
    input_name: str = "HU"
    input_layout: str = "NHW"  # NHW | NCHW | NHWC
    input_channels: int = 1  # 3: the grey image is repeated into RGB
    input_dtype: str = "FP32"  # FP32 | UINT8 (UINT8 scales [0, 1] to [0, 255])
    input_scale: float = 1.0  # applied after intensity normalisation: value * scale + offset
    input_offset: float = 0.0
    output_name: str = "SCORES"  # class_scores: the [N, classes] probability output
    # slice: a series may be split into several requests (and merged with other studies' slices by Triton);
    # volume: the whole series is one request (3D models that look across slices).
    input_scope: str = "slice"
    # Name of an extra FP32 [3] input that receives the model-grid spacing in mm (slice, row, column); empty: none.
    spacing_input: str = ""
    # Per-slice models only: a request may carry slices of several studies ([triton] batch_delay_ms); the study
    # score is then the maximum of the study's SLICE_SCORES. Set false for a model whose STUDY_SCORE is not that.
    cross_study_batching: bool = True

    @property
    def batchable(self) -> bool:
        """May this pipeline's slices share Triton requests with other studies?"""
        return self.cross_study_batching and self.input_scope == "slice" and not self.spacing_input

    def __post_init__(self) -> None:
        where = f"pipeline {self.name!r}"
        if not 0.0 <= self.report_threshold <= 1.0 or not 0.0 <= self.stat_threshold <= 1.0:
            raise ConfigError(f"{where}: report_threshold and stat_threshold must be within [0, 1]")
        if self.intensity not in ("hu", "window", "percentile"):
            raise ConfigError(
                f"{where}: intensity must be 'hu', 'window' or 'percentile', got {self.intensity!r}"
            )
        if self.intensity == "window" and self.window is None:
            raise ConfigError(f"{where}: intensity = 'window' needs window = [center, width]")
        if min(self.input_size) < 8:
            raise ConfigError(f"{where}: input_size must be at least 8x8, got {self.input_size}")
        if not self.labels:
            raise ConfigError(f"{where}: at least one label (pipelines.labels.<class index>) is required")
        if self.output_kind not in ("detections", "class_scores"):
            raise ConfigError(
                f"{where}: output_kind must be detections or class_scores, got {self.output_kind!r}"
            )
        if self.input_layout not in ("NHW", "NCHW", "NHWC"):
            raise ConfigError(f"{where}: input_layout must be NHW, NCHW or NHWC, got {self.input_layout!r}")
        if self.input_channels not in (1, 3) or (self.input_layout == "NHW" and self.input_channels != 1):
            raise ConfigError(f"{where}: input_channels must be 1 or 3 (and 1 for layout NHW)")
        if self.input_dtype not in ("FP32", "UINT8"):
            raise ConfigError(f"{where}: input_dtype must be FP32 or UINT8, got {self.input_dtype!r}")
        if self.input_scope not in ("slice", "volume"):
            raise ConfigError(f"{where}: input_scope must be slice or volume, got {self.input_scope!r}")
        if self.output_kind == "class_scores" and self.segmentation:
            raise ConfigError(f"{where}: segmentation needs output_kind = detections")
        if not self.modalities:
            raise ConfigError(f"{where}: modalities must list at least one modality")


@dataclass(frozen=True, kw_only=True)
class Settings:
    data_dir: Path
    log_level: str = "INFO"
    quiet_period_s: float = 10.0
    # A study whose last association was aborted or had instances refused waits this long for more instances
    # before it is analysed (and its results then say the study may be incomplete).
    incomplete_guard_s: float = 300.0
    workers: int = 2
    # Results (SR, GSPS, SEG) are encoded in this many worker processes, off the interpreter lock that the
    # receiver and the workers share; 0: in the worker threads.
    encode_processes: int = 2
    force_cpu: bool = False
    # auto: CuPy where a CUDA device works, else numpy. dali: the NVIDIA DALI pipeline (on the GPU when CuPy
    # finds one and force_cpu is off, else on the CPU), numpy / CuPy for what DALI does not implement.
    preprocess_backend: str = "auto"
    # Image decode: auto (nvImageCodec on a GPU for the JPEG / JPEG 2000 transfer syntaxes when installed, pydicom
    # otherwise) | pydicom | nvimgcodec (also on the CPU). pydicom takes over any frame nvImageCodec fails on.
    decode_backend: str = "auto"
    stat_webhook_url: str = ""
    # Optional URL that receives a JSON POST for every routed series that could not be analysed.
    failure_webhook_url: str = ""
    receiver: ReceiverSettings = field(default_factory=ReceiverSettings)
    triton: TritonSettings = field(default_factory=TritonSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    fhir: FhirSettings = field(default_factory=FhirSettings)
    hl7: Hl7Settings = field(default_factory=Hl7Settings)
    http: HttpSettings = field(default_factory=HttpSettings)
    scheduling: SchedulingSettings = field(default_factory=SchedulingSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    peers: tuple[Peer, ...] = ()
    pipelines: tuple[PipelineSettings, ...] = ()

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def outbox_dir(self) -> Path:
        return self.data_dir / "outbox"

    @property
    def audit_log(self) -> Path:
        return self.data_dir / "audit.jsonl"

    def allowed_calling_aes(self) -> frozenset[str]:
        return frozenset(self.receiver.allowed_calling_aes) | {p.ae_title for p in self.peers}

    def destination_for(self, calling_ae: str) -> Peer | None:
        """Where results go: the configured destination, else the known peer that sent the study."""
        return self.delivery.destination or self.peer_for(calling_ae)

    def peer_for(self, ae_title: str) -> Peer | None:
        for peer in self.peers:
            if peer.ae_title == ae_title:
                return peer
        return None


def default_model_repository() -> Path:
    """The ``model_repository/`` folder of this source tree."""
    return Path(__file__).resolve().parents[2] / "model_repository"


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class _Reader:
    """Pulls typed values out of a TOML table, naming the full key in every error."""

    def __init__(self, table: dict[str, Any], prefix: str) -> None:
        self.table = table
        self.prefix = prefix
        self.used: set[str] = set()

    def _get(self, key: str, default: Any) -> Any:
        self.used.add(key)
        return self.table.get(key, default)

    def _fail(self, key: str, expected: str, value: Any) -> ConfigError:
        return ConfigError(f"{self.prefix}{key}: expected {expected}, got {value!r}")

    def get_str(self, key: str, default: str | None = None) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise self._fail(key, "a string", value)
        return value

    def get_int(self, key: str, default: int | None = None) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, "an integer", value)
        return value

    def get_float(self, key: str, default: float | None = None) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._fail(key, "a number", value)
        return float(value)

    def get_bool(self, key: str, default: bool | None = None) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self._fail(key, "true or false", value)
        return value

    def get_strs(self, key: str, default: list[str] | None = None) -> tuple[str, ...]:
        value = self._get(key, default if default is not None else [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._fail(key, "a list of strings", value)
        return tuple(value)

    def get_pair(self, key: str, default: list[float] | None = None) -> tuple[float, float] | None:
        value = self._get(key, default)
        if value is None:
            return None
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        ):
            raise self._fail(key, "a list of two numbers", value)
        return (float(value[0]), float(value[1]))

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise ConfigError(f"{self.prefix}: unknown setting(s) {', '.join(unknown)}")


def _table(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{key}] must be a table")
    return value


def _pipeline(raw: Any, index: int) -> PipelineSettings:
    if not isinstance(raw, dict):
        raise ConfigError(f"pipelines[{index}] must be a table")
    r = _Reader(raw, f"pipelines[{index}].")
    name = r.get_str("name")
    labels_raw = r._get("labels", {})
    if not isinstance(labels_raw, dict):
        raise ConfigError(f"pipeline {name!r}: labels must be a table of class index -> code")
    labels: dict[int, CodedConcept] = {}
    for key, code in labels_raw.items():
        if not str(key).isdigit():
            raise ConfigError(f"pipeline {name!r}: labels.{key} must be a class index (0, 1, ...)")
        if isinstance(code, str):  # a key of the terminology table
            labels[int(key)] = finding_type(code)
            continue
        if not isinstance(code, dict):
            raise ConfigError(
                f"pipeline {name!r}: labels.{key} must be a terminology key or value/scheme/meaning"
            )
        lr = _Reader(code, f"pipeline {name!r} labels.{key}.")
        try:
            labels[int(key)] = CodedConcept(
                value=lr.get_str("value"), scheme=lr.get_str("scheme"), meaning=lr.get_str("meaning")
            )
        except ValueError as exc:
            raise ConfigError(f"pipeline {name!r} labels.{key}: {exc}") from exc
        lr.finish()
    patterns = []
    for text in r.get_strs("description_patterns", []):
        try:
            patterns.append(re.compile(text))
        except re.error as exc:
            raise ConfigError(f"pipeline {name!r}: bad description pattern {text!r}: {exc}") from exc
    size = r.get_pair("input_size")
    mode_text = r.get_str("mode", "assist")
    try:
        mode = RolloutMode(mode_text)
    except ValueError:
        raise ConfigError(
            f"pipeline {name!r}: mode must be silent, assist or triage; got {mode_text!r}"
        ) from None
    hu_clip = r.get_pair("hu_clip", [-1024.0, 3071.0])
    display = r.get_pair("display_window", [40.0, 400.0])
    assert size is not None and hu_clip is not None and display is not None
    settings = PipelineSettings(
        name=name,
        model=r.get_str("model", name),
        description=r.get_str("description", ""),
        algorithm_name=r.get_str("algorithm_name", name),
        algorithm_version=r.get_str("algorithm_version"),
        mode=mode,
        report_threshold=r.get_float("report_threshold", 0.5),
        stat_threshold=r.get_float("stat_threshold", 0.9),
        modalities=tuple(m.upper() for m in r.get_strs("modalities")),
        body_parts=tuple(b.upper() for b in r.get_strs("body_parts", [])),
        description_patterns=tuple(patterns),
        input_size=(int(size[0]), int(size[1])),
        intensity=r.get_str("intensity", "hu"),
        hu_clip=hu_clip,
        window=r.get_pair("window", None),
        display_window=display,
        labels=labels,
        min_slices=r.get_int("min_slices", 1),
        anatomy=r.get_str("anatomy", ""),
        anatomy_min_fraction=r.get_float("anatomy_min_fraction", 0.2),
        finding_anatomy=r.get_str("finding_anatomy", ""),
        finding_size_mm=r.get_pair("finding_size_mm", None),
        segmentation=r.get_bool("segmentation", False),
        output_kind=r.get_str("output_kind", "detections"),
        input_name=r.get_str("input_name", "HU"),
        input_layout=r.get_str("input_layout", "NHW").upper(),
        input_channels=r.get_int("input_channels", 1),
        input_dtype=r.get_str("input_dtype", "FP32").upper(),
        input_scale=r.get_float("input_scale", 1.0),
        input_offset=r.get_float("input_offset", 0.0),
        output_name=r.get_str("output_name", "SCORES"),
        input_scope=r.get_str("input_scope", "slice"),
        spacing_input=r.get_str("spacing_input", ""),
        cross_study_batching=r.get_bool("cross_study_batching", True),
    )
    if settings.anatomy not in ("", "lung"):
        raise ConfigError(f"pipelines[{index}].anatomy must be '' or 'lung', got {settings.anatomy!r}")
    if settings.finding_anatomy not in ("", "body", "lung", "intracranial"):
        raise ConfigError(
            f"pipelines[{index}].finding_anatomy must be '', 'body', 'lung' or 'intracranial', "
            f"got {settings.finding_anatomy!r}"
        )
    if (
        settings.finding_size_mm is not None
        and not 0 <= settings.finding_size_mm[0] < settings.finding_size_mm[1]
    ):
        raise ConfigError(f"pipelines[{index}].finding_size_mm must be [min, max] with 0 <= min < max")
    if not 0.0 < settings.anatomy_min_fraction <= 1.0:
        raise ConfigError(f"pipelines[{index}].anatomy_min_fraction must be in (0, 1]")
    r.finish()
    return settings


def _scheduling(r: _Reader) -> SchedulingSettings:
    weights_raw = r._get("pacs_weights", {})
    deadlines_raw = r._get("deadline_s", {})
    if not isinstance(weights_raw, dict) or not isinstance(deadlines_raw, dict):
        raise ConfigError("scheduling.pacs_weights and scheduling.deadline_s must be tables")
    weights = {}
    for ae, weight in weights_raw.items():
        if not isinstance(weight, int | float) or isinstance(weight, bool) or weight <= 0:
            raise ConfigError(f"scheduling.pacs_weights.{ae} must be a number > 0, got {weight!r}")
        weights[_check_ae("scheduling.pacs_weights", ae)] = float(weight)
    deadlines = dict(SchedulingSettings().deadline_s)
    for name, seconds in deadlines_raw.items():
        if name.upper() not in deadlines:
            raise ConfigError(f"scheduling.deadline_s.{name}: the classes are STAT, URGENT and ROUTINE")
        if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds <= 0:
            raise ConfigError(
                f"scheduling.deadline_s.{name} must be a number of seconds > 0, got {seconds!r}"
            )
        deadlines[name.upper()] = float(seconds)
    settings = SchedulingSettings(
        pacs_weights=weights,
        default_weight=r.get_float("default_weight", 1.0),
        deadline_s=deadlines,
        promote_fraction=r.get_float("promote_fraction", 0.5),
        stat_workers=r.get_int("stat_workers", 1),
    )
    if settings.default_weight <= 0 or settings.promote_fraction <= 0:
        raise ConfigError("scheduling.default_weight and scheduling.promote_fraction must be > 0")
    if settings.stat_workers < 0:
        raise ConfigError("scheduling.stat_workers must be >= 0")
    return settings


def load_settings(config_file: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build ``Settings`` from the embedded defaults, an optional TOML file and flag overrides.

    ``overrides`` uses the TOML layout (``{"receiver": {"port": 104}}``). ``[[pipelines]]`` and ``[[peers]]``
    in the file replace the defaults as a whole.
    """
    raw = tomllib.loads(resources.files("gateway.config").joinpath("default_config.toml").read_text())
    base_dir = Path.cwd()
    if config_file is not None:
        try:
            text = Path(config_file).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc.strerror}") from exc
        try:
            user = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_file} is not valid TOML: {exc}") from exc
        raw = _merge(raw, user)
        base_dir = Path(config_file).resolve().parent
    if overrides:
        raw = _merge(raw, overrides)

    top = _Reader(raw, "")
    recv = _Reader(_table(raw, "receiver"), "receiver.")
    tri = _Reader(_table(raw, "triton"), "triton.")
    dlv = _Reader(_table(raw, "delivery"), "delivery.")
    fr = _Reader(_table(raw, "fhir"), "fhir.")
    hr = _Reader(_table(raw, "hl7"), "hl7.")
    htr = _Reader(_table(raw, "http"), "http.")
    sch = _Reader(_table(raw, "scheduling"), "scheduling.")
    ret = _Reader(_table(raw, "retention"), "retention.")
    for key in (
        "receiver",
        "triton",
        "delivery",
        "fhir",
        "hl7",
        "http",
        "scheduling",
        "retention",
        "peers",
        "pipelines",
    ):
        top.used.add(key)

    def resolve(path_text: str) -> Path:
        path = Path(path_text).expanduser()
        return path if path.is_absolute() else (base_dir / path).resolve()

    def _optional_path(text: str) -> Path | None:
        return resolve(text) if text else None

    receiver = ReceiverSettings(
        ae_title=_check_ae("receiver.ae_title", recv.get_str("ae_title")),
        host=recv.get_str("host"),
        port=recv.get_int("port"),
        allowed_calling_aes=tuple(
            _check_ae("receiver.allowed_calling_aes", a) for a in recv.get_strs("allowed_calling_aes")
        ),
        acse_timeout_s=recv.get_float("acse_timeout_s"),
        dimse_timeout_s=recv.get_float("dimse_timeout_s"),
        network_timeout_s=recv.get_float("network_timeout_s"),
        max_pdu_size=recv.get_int("max_pdu_size"),
        min_free_disk_mb=recv.get_int("min_free_disk_mb"),
        allowed_addresses=recv.get_strs("allowed_addresses", []),
        tls_cert_file=_optional_path(recv.get_str("tls_cert_file", "")),
        tls_key_file=_optional_path(recv.get_str("tls_key_file", "")),
        tls_ca_file=_optional_path(recv.get_str("tls_ca_file", "")),
    )
    if bool(receiver.tls_cert_file) != bool(receiver.tls_key_file):
        raise ConfigError("receiver.tls_cert_file and receiver.tls_key_file must be set together")
    for tls_path in (receiver.tls_cert_file, receiver.tls_key_file, receiver.tls_ca_file):
        if tls_path is not None and not tls_path.is_file():
            raise ConfigError(f"TLS file {tls_path} does not exist")
    if not 0 < receiver.port < 65536:
        raise ConfigError(f"receiver.port must be 1-65535, got {receiver.port}")
    repo_text = tri.get_str("model_repository")
    triton = TritonSettings(
        url=tri.get_str("url"),
        model_repository=resolve(repo_text) if repo_text else default_model_repository(),
        startup_timeout_s=tri.get_float("startup_timeout_s"),
        request_timeout_s=tri.get_float("request_timeout_s"),
        max_slices_per_request=tri.get_int("max_slices_per_request"),
        retry_max_s=tri.get_float("retry_max_s"),
        transport=tri.get_str("transport", "auto"),
        batch_delay_ms=tri.get_float("batch_delay_ms", 5.0),
        cross_study_batching=tri.get_bool("cross_study_batching", True),
    )
    if triton.transport not in ("auto", "shared_memory", "grpc"):
        raise ConfigError(f"triton.transport must be auto, shared_memory or grpc, got {triton.transport!r}")
    if triton.batch_delay_ms < 0:
        raise ConfigError("triton.batch_delay_ms must be >= 0")
    destination_text = dlv.get_str("destination")
    delivery = DeliverySettings(
        destination=Peer.parse(destination_text) if destination_text else None,
        timeout_s=dlv.get_float("timeout_s"),
        max_attempts=dlv.get_int("max_attempts"),
        retry_base_s=dlv.get_float("retry_base_s"),
        retry_max_s=dlv.get_float("retry_max_s"),
    )
    if delivery.max_attempts < 1:
        raise ConfigError("delivery.max_attempts must be >= 1")
    retention = RetentionSettings(
        spool_days=ret.get_float("spool_days", 30.0),
        results_days=ret.get_float("results_days", 90.0),
        audit_days=ret.get_float("audit_days", 365.0),
        dead_letter_days=ret.get_float("dead_letter_days", 30.0),
        min_free_disk_mb=ret.get_int("min_free_disk_mb", 0),
        interval_s=ret.get_float("interval_s", 3600.0),
    )
    for key in ("spool_days", "results_days", "audit_days", "dead_letter_days", "min_free_disk_mb"):
        if getattr(retention, key) < 0:
            raise ConfigError(
                f"retention.{key} must be >= 0 (0 keeps for ever), got {getattr(retention, key)}"
            )
    if retention.interval_s <= 0:
        raise ConfigError(f"retention.interval_s must be > 0, got {retention.interval_s}")
    tokens = []
    for i, t in enumerate(_table(raw, "http").get("tokens", [])):
        tr = _Reader(t, f"http.tokens[{i}].")
        token = HttpToken(
            name=tr.get_str("name"), role=tr.get_str("role"), sha256=tr.get_str("sha256").lower()
        )
        tr.finish()
        if token.role not in ("read-only", "operator", "admin"):
            raise ConfigError(
                f"http.tokens[{i}].role must be read-only, operator or admin, got {token.role!r}"
            )
        if not re.match(r"^[0-9a-f]{64}$", token.sha256):
            raise ConfigError(f"http.tokens[{i}].sha256 must be a 64-character hex SHA-256 digest")
        tokens.append(token)
    http = HttpSettings(
        enabled=htr.get_bool("enabled"),
        host=htr.get_str("host"),
        port=htr.get_int("port"),
        tokens=tuple(tokens),
    )
    htr.used.add("tokens")
    fhir = FhirSettings(
        url=fr.get_str("url"), timeout_s=fr.get_float("timeout_s"), attempts=fr.get_int("attempts")
    )
    if fhir.url and not fhir.url.startswith(("http://", "https://")):
        raise ConfigError(f"fhir.url must be an http(s) URL, got {fhir.url!r}")
    hl7 = Hl7Settings(
        endpoint=hr.get_str("endpoint"),
        sending_facility=hr.get_str("sending_facility"),
        receiving_application=hr.get_str("receiving_application"),
        receiving_facility=hr.get_str("receiving_facility"),
        timeout_s=hr.get_float("timeout_s"),
        attempts=hr.get_int("attempts"),
    )
    if hl7.endpoint and not re.match(r"^[^:]+:\d+$", hl7.endpoint):
        raise ConfigError(f"hl7.endpoint must be host:port, got {hl7.endpoint!r}")
    peers_raw = raw.get("peers", [])
    if not isinstance(peers_raw, list):
        raise ConfigError("[[peers]] must be an array of tables")
    peers = []
    for i, p in enumerate(peers_raw):
        pr = _Reader(p, f"peers[{i}].")
        peers.append(
            Peer(
                ae_title=pr.get_str("ae_title"), host=pr.get_str("host", "127.0.0.1"), port=pr.get_int("port")
            )
        )
        pr.finish()
    scheduling = _scheduling(sch)
    pipelines_raw = raw.get("pipelines", [])
    if not isinstance(pipelines_raw, list):
        raise ConfigError("[[pipelines]] must be an array of tables")
    pipelines = tuple(_pipeline(p, i) for i, p in enumerate(pipelines_raw))
    names = [p.name for p in pipelines]
    if len(set(names)) != len(names):
        raise ConfigError(f"pipeline names must be unique, got {names}")

    settings = Settings(
        data_dir=resolve(top.get_str("data_dir")),
        log_level=top.get_str("log_level").upper(),
        quiet_period_s=top.get_float("quiet_period_s"),
        incomplete_guard_s=top.get_float("incomplete_guard_s", 300.0),
        workers=top.get_int("workers"),
        encode_processes=top.get_int("encode_processes", 2),
        force_cpu=top.get_bool("force_cpu"),
        preprocess_backend=top.get_str("preprocess_backend", "auto"),
        decode_backend=top.get_str("decode_backend", "auto"),
        stat_webhook_url=top.get_str("stat_webhook_url"),
        failure_webhook_url=top.get_str("failure_webhook_url", ""),
        receiver=receiver,
        triton=triton,
        delivery=delivery,
        fhir=fhir,
        hl7=hl7,
        http=http,
        scheduling=scheduling,
        retention=retention,
        peers=tuple(peers),
        pipelines=pipelines,
    )
    for reader in (top, recv, tri, dlv, fr, hr, htr, sch, ret):
        reader.finish()
    if settings.quiet_period_s <= 0:
        raise ConfigError(f"quiet_period_s must be > 0, got {settings.quiet_period_s}")
    if settings.incomplete_guard_s < settings.quiet_period_s:
        raise ConfigError(
            f"incomplete_guard_s ({settings.incomplete_guard_s}) must be >= quiet_period_s ({settings.quiet_period_s})"
        )
    if settings.decode_backend not in ("auto", "pydicom", "nvimgcodec"):
        raise ConfigError(
            f"decode_backend must be auto, pydicom or nvimgcodec, got {settings.decode_backend!r}"
        )
    if settings.preprocess_backend not in ("auto", "dali"):
        raise ConfigError(f"preprocess_backend must be auto or dali, got {settings.preprocess_backend!r}")
    if settings.encode_processes < 0:
        raise ConfigError(f"encode_processes must be >= 0, got {settings.encode_processes}")
    if settings.workers < 1:
        raise ConfigError(f"workers must be >= 1, got {settings.workers}")
    if triton.max_slices_per_request < 1:
        raise ConfigError("triton.max_slices_per_request must be >= 1")
    return settings
