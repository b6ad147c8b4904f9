"""Typed settings, read once at start-up from the embedded defaults, a TOML file and command-line flags.

Precedence: command line > ``--config FILE`` > embedded ``default_config.toml``. Every table is a strict
pydantic model (:mod:`gateway.config.base`): unknown keys are refused, closed vocabularies are enums, ranges are
checked, and a bad value fails loudly with a :class:`~gateway.core.errors.ConfigError` naming the TOML key.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, ValidationInfo, model_validator

from gateway.config import sources
from gateway.config.base import (
    LAX,
    AeTitle,
    Choice,
    ListenPort,
    Lower,
    NonNegative,
    OptionalPath,
    Port,
    Positive,
    ResolvedPath,
    Seconds,
    Section,
    check_ae,
    resolve,
)
from gateway.config.messages import describe
from gateway.config.pipeline import PipelineSettings, unique_names
from gateway.core.errors import ConfigError

_PEER_RE = re.compile(r"^([^@]{1,16})@([^:@]+):(\d+)$")


class Peer(Section):
    """A DICOM application entity the gateway talks to."""

    ae_title: AeTitle
    host: str = "127.0.0.1"
    port: Port

    @classmethod
    def parse(cls, text: str) -> Peer:
        """Parse ``AET@host:port``."""
        match = _PEER_RE.match(text.strip())
        if not match:
            raise ConfigError(f"expected AET@host:port, got {text!r}")
        try:
            return cls(ae_title=match.group(1), host=match.group(2), port=int(match.group(3)))
        except ValidationError as exc:
            raise ConfigError(f"{text!r}: {describe(exc, cls, {})}") from None

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def _peer_or_none(value: Any) -> Any:
    if value == "" or value is None:
        return None
    if isinstance(value, str):
        match = _PEER_RE.match(value.strip())
        if not match:
            raise ValueError(f"expected AET@host:port, got {value!r}")
        return {"ae_title": match.group(1), "host": match.group(2), "port": int(match.group(3))}
    return value


def _existing_file(value: Path | None) -> Path | None:
    if value is not None and not value.is_file():
        raise ValueError(f"TLS file {value} does not exist")
    return value


TlsFile = Annotated[OptionalPath, AfterValidator(_existing_file)]


class ReceiverSettings(Section):
    # Which C-STORE receiver runs: "pynetdicom" (Python, every DIMSE service on one port) or "native" (DCMTK,
    # `make native`; C-STORE and C-ECHO at native speed, the same policy and durability rule).
    engine: Literal["pynetdicom", "native"] = "pynetdicom"
    ae_title: AeTitle = "AI_GATEWAY"
    host: str = "127.0.0.1"
    port: Port = 11112
    allowed_calling_aes: tuple[AeTitle, ...] = ()
    acse_timeout_s: Seconds = 30.0
    dimse_timeout_s: Seconds = 60.0
    network_timeout_s: Seconds = 60.0
    max_pdu_size: Annotated[int, Field(ge=0)] = 0
    min_free_disk_mb: Annotated[int, Field(ge=0)] = 512
    allowed_addresses: tuple[str, ...] = ()  # empty: any source address
    tls_cert_file: TlsFile = None  # DICOM TLS when set (PEM certificate chain of the gateway)
    tls_key_file: TlsFile = None
    tls_ca_file: TlsFile = None  # when set, callers must present a certificate signed by this CA
    # MPPS (N-CREATE / N-SET) and Instance Availability Notification (N-CREATE) on the same AE: a study closes when
    # every instance its completed procedure step or notice lists is in the spool, not after the quiet period.
    accept_notices: bool = True
    # A study held open by an MPPS in progress closes this long after its last instance if no N-SET COMPLETED
    # comes (a lost MPPS).
    notice_longest_wait_s: Seconds = 1800.0
    # With engine = "native": a second port, served by the pynetdicom receiver, for what the native one does not
    # answer - MPPS / IAN notices, UPS tasks and the verdicts viewers send as DICOM (edited GSPS / SR, rejection
    # KOS); images may come to either port. Same AE title, policy and TLS. Unset: the native receiver alone (and
    # settings that need those services are refused at start).
    services_port: Port | None = None
    # With engine = "native": the size of a journal (MiB, written out once in the spool; 0: none, the default).
    # With one, an instance is acknowledged once it is in the journal, fdatasync'ed (several associations share
    # one sync); its spool file is written just after and synced in batches - one sync per instance instead of
    # three, the same guarantee (a crash before the file is synced is repaired from the journal at the next
    # start), but every byte written twice. It pays where a sync's fixed cost dominates (see the README);
    # without it each instance's file and folder are fsynced before its acknowledgement.
    journal_mb: Annotated[int, Field(ge=0, le=65536)] = 0

    @model_validator(mode="after")
    def _tls_pair(self) -> ReceiverSettings:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        return self

    @model_validator(mode="after")
    def _services_port(self) -> ReceiverSettings:
        if self.services_port is not None and self.engine != "native":
            raise ValueError(
                'services_port is for engine = "native" (pynetdicom serves every service on port)'
            )
        if self.services_port is not None and self.services_port == self.port:
            raise ValueError("services_port must differ from port")
        return self


class Transport(Choice):
    AUTO = "auto"  # shared memory to a Triton on this host, else gRPC
    SHARED_MEMORY = "shared_memory"
    GRPC = "grpc"


def default_model_repository() -> Path:
    """The ``model_repository/`` folder of this source tree."""
    return Path(__file__).resolve().parents[2] / "model_repository"


def _repository(value: Any, info: ValidationInfo) -> Path:
    return default_model_repository() if value == "" else resolve(value, info)


class TritonSettings(Section):
    url: str = ""
    model_repository: Annotated[Path, BeforeValidator(_repository)] = Field(
        default_factory=default_model_repository
    )
    startup_timeout_s: Seconds = 120.0
    request_timeout_s: Seconds = 60.0
    max_slices_per_request: Annotated[int, Field(ge=1)] = 32
    retry_max_s: Seconds = 60.0  # longest wait between inference retries while Triton is unavailable
    transport: Annotated[Transport, LAX] = Transport.AUTO
    # Cross-study batching: a request of a per-slice model is sent when it holds max_slices_per_request slices
    # (of any studies) or when its first slice has waited this long; STAT does not wait. 0: never wait.
    batch_delay_ms: NonNegative = 5.0
    cross_study_batching: bool = True


class DeliverySettings(Section):
    destination: Annotated[Peer | None, BeforeValidator(_peer_or_none)] = None
    timeout_s: Seconds = 30.0
    max_attempts: Annotated[int, Field(ge=1)] = 8  # then the dead-letter area (gateway resend brings it back)
    retry_base_s: Seconds = 2.0
    retry_max_s: Seconds = 300.0


class RetentionSettings(Section):
    """How long what the gateway keeps is kept (days; 0 keeps it for ever), and the free space a purge frees.

    Work that is not yet analysed or not yet delivered is never purged, whatever its age."""

    spool_days: NonNegative = 30.0
    results_days: NonNegative = 90.0
    audit_days: NonNegative = 365.0
    dead_letter_days: NonNegative = 30.0
    # When free space on the data disk is below this, delivered studies are purged oldest first, before their
    # age, until it is reached again (0: by age only).
    min_free_disk_mb: Annotated[int, Field(ge=0)] = 0
    interval_s: Seconds = 3600.0  # how often the running gateway purges


_CLASSES = ("STAT", "URGENT", "ROUTINE")


def _deadlines(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    deadlines = {"STAT": 120.0, "URGENT": 600.0, "ROUTINE": 3600.0}
    for name, seconds in value.items():
        if str(name).upper() not in _CLASSES:
            raise ValueError(f"{name}: the classes are STAT, URGENT and ROUTINE")
        deadlines[str(name).upper()] = seconds
    return deadlines


class SchedulingSettings(Section):
    """Who gets the next inference slot: STAT before URGENT before ROUTINE; within a class, a weighted fair
    share per sending PACS (calling AE); a waiting job moves up one class (never to STAT) once it has waited
    ``promote_fraction`` of its class deadline."""

    pacs_weights: dict[AeTitle, Positive] = Field(default_factory=dict)  # calling AE -> weight (> 0)
    default_weight: Positive = 1.0
    deadline_s: Annotated[dict[str, Seconds], BeforeValidator(_deadlines)] = Field(
        default_factory=lambda: {"STAT": 120.0, "URGENT": 600.0, "ROUTINE": 3600.0}
    )
    promote_fraction: Positive = 0.5
    # Workers that take only STAT jobs, on top of ``workers``: a STAT study never waits for a routine job to end.
    stat_workers: Annotated[int, Field(ge=0)] = 1

    def weight(self, calling_ae: str) -> float:
        return self.pacs_weights.get(calling_ae, self.default_weight)


class TokenRole(Choice):
    READ_ONLY = "read-only"  # queues, studies' states, health: no AI results
    OPERATOR = "operator"  # read-only, and resends dead letters
    ADMIN = "admin"  # everything an operator and QA may do; models, thresholds and rollout modes
    SENDER = "sender"  # a system that sends studies by STOW-RS (a VNA, a cloud archive); nothing else
    RADIOLOGIST = "radiologist"  # sees AI results and records verdicts on them
    QA = "qa"  # sees AI results, verdicts and AI-vs-report discrepancies; assigns peer review


def _sha256(value: str) -> str:
    if not re.match(r"^[0-9a-f]{64}$", value):
        raise ValueError("must be a 64-character hex SHA-256 digest")
    return value


class HttpToken(Section):
    name: str
    role: Annotated[TokenRole, LAX]
    sha256: Annotated[Lower, AfterValidator(_sha256)]  # of the bearer token; the token itself is never stored
    # STOW-RS: the AE title the sender's instances are recorded under, as a DIMSE sender's calling AE title
    # (its peer gets the results, fair share and routing rules by site use it); empty: the token's name.
    ae_title: Annotated[str, BeforeValidator(lambda v: str(v).strip())] = ""

    @model_validator(mode="after")
    def _sender_ae(self) -> HttpToken:
        if self.role is TokenRole.SENDER:
            check_ae(self.source_ae)
        return self

    @property
    def source_ae(self) -> str:
        return self.ae_title or self.name.upper()


def _http_url(value: str) -> str:
    if value and not value.startswith(("http://", "https://")):
        raise ValueError(f"must be an http(s) URL, got {value!r}")
    return value


class OidcSettings(Section):
    """People sign in with an OpenID Connect provider: the API takes its signed ID / access tokens (JWT) as
    bearer tokens, checked against the provider's published keys (JWKS). Static tokens stay for machines."""

    issuer: str = ""  # the token's "iss"; empty: OpenID Connect is off
    audience: str = ""  # the token's "aud" (the client id the provider issued for the gateway)
    jwks_url: Annotated[str, AfterValidator(_http_url)] = ""  # the provider's JWKS endpoint
    jwks_file: ResolvedPath | None = None  # or the keys from a file (an offline provider, tests)
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    user_claim: str = "sub"  # a pseudonymous user id: what verdicts and audit events record, never a name
    roles_claim: str = "roles"  # a list of role names (or of the provider's group names mapped by role_map)
    groups_claim: str = "groups"  # the user's groups (rollout pilot groups)
    role_map: dict[str, Annotated[TokenRole, LAX]] = Field(default_factory=dict)  # provider's name -> role
    leeway_s: Annotated[float, Field(ge=0, le=300)] = 30.0  # clock skew allowed on exp / nbf / iat
    # The dashboard's sign-in in the browser (authorization code with PKCE): the provider's endpoints, and the
    # public client the dashboard is registered as (default: the audience).
    authorization_endpoint: Annotated[str, AfterValidator(_http_url)] = ""
    token_endpoint: Annotated[str, AfterValidator(_http_url)] = ""
    client_id: str = ""
    scope: str = "openid"

    @property
    def enabled(self) -> bool:
        return bool(self.issuer)

    @model_validator(mode="after")
    def _keys(self) -> OidcSettings:
        if self.issuer and bool(self.jwks_url) == bool(self.jwks_file):
            raise ValueError("[http.oidc] needs exactly one of jwks_url or jwks_file")
        if self.issuer and not self.audience:
            raise ValueError("[http.oidc] audience must be set (the gateway's client id at the provider)")
        if not set(self.algorithms) <= {"RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "EdDSA"}:
            raise ValueError(
                f"[http.oidc] algorithms must be asymmetric JWT algorithms, got {self.algorithms}"
            )
        return self


class HttpSettings(Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: ListenPort = 8080
    tokens: tuple[HttpToken, ...] = ()
    tls_cert_file: TlsFile = None  # HTTPS when set (PEM certificate chain of the gateway)
    tls_key_file: TlsFile = None
    tls_ca_file: TlsFile = None  # when set, clients must present a certificate signed by this CA
    stow_max_bytes: Annotated[int, Field(ge=1 << 20)] = 1 << 30  # one STOW-RS request's body
    oidc: OidcSettings = Field(default_factory=OidcSettings)

    @model_validator(mode="after")
    def _tls_pair(self) -> HttpSettings:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_ca_file and not self.tls_cert_file:
            raise ValueError("tls_ca_file needs tls_cert_file and tls_key_file")
        return self


class FhirSettings(Section):
    url: Annotated[str, AfterValidator(_http_url)] = ""  # accepts a transaction Bundle; empty: files only
    timeout_s: Seconds = 10.0
    attempts: Annotated[int, Field(ge=1)] = 3


def _host_port(value: str) -> str:
    if value and not re.match(r"^[^:]+:\d+$", value):
        raise ValueError(f"must be host:port, got {value!r}")
    return value


class Hl7Settings(Section):
    endpoint: Annotated[str, AfterValidator(_host_port)] = ""  # of an MLLP listener; empty: files only
    sending_facility: str = "AI_GATEWAY"
    receiving_application: str = "RIS"
    receiving_facility: str = "HOSPITAL"
    timeout_s: Seconds = 10.0
    attempts: Annotated[int, Field(ge=1)] = 3

    def address(self) -> tuple[str, int] | None:
        if not self.endpoint:
            return None
        host, _, port = self.endpoint.rpartition(":")
        return host, int(port)


def _database_url(value: str) -> str:
    if value and not value.startswith(("sqlite:///", "postgresql://", "postgresql+psycopg://")):
        raise ValueError(
            f"must be sqlite:///PATH or postgresql://USER@HOST:PORT/DB, got {value.split('@')[-1]!r}"
        )
    return value


# The database URL from the environment when the settings leave [database] url empty (a password then never sits in
# a settings file).
DATABASE_URL_ENV = "GATEWAY_DATABASE_URL"


class DatabaseSettings(Section):
    # The system of record. Empty: an SQLite file in the data folder (data_dir/gateway.db). Several gateways
    # share one PostgreSQL: postgresql://USER[:PASSWORD]@HOST:PORT/DATABASE (a password is never logged).
    url: Annotated[str, AfterValidator(_database_url)] = ""
    # This gateway's name in the audit trail, /health and the database (empty: the host name).
    node_id: Annotated[str, Field(max_length=64)] = ""


def _hl7_field(value: str) -> str:
    if value and not re.fullmatch(r"[A-Z0-9]{3}-[0-9]+(\.[0-9]+)?", value.upper()):
        raise ValueError(f"{value!r} is not an HL7 field: SEG-N or SEG-N.C (e.g. OBR-37), or empty")
    return value.upper()


class OrdersSettings(Section):
    # The RIS's HL7 v2 order feed over MLLP: ADT^A01/A04/A08, ORM^O01, OMI^O23; each order is stored (by accession
    # number) before it is acknowledged. Off unless enabled.
    enabled: bool = False
    host: str = "127.0.0.1"
    port: ListenPort = 2575
    application: str = (
        "AI_GATEWAY"  # MSH-3 / MSH-4 of our acknowledgements when the message names no receiver
    )
    facility: str = "AI_GATEWAY"
    # Where an order says how many images its study holds (HL7 v2 has no standard field; "" ignores it). A study
    # with that many images in the spool closes at once, not after the quiet period.
    expected_images_field: Annotated[str, AfterValidator(_hl7_field)] = "OBR-37"
    # MLLP over TLS when set (PEM); with a CA file, the RIS must present a certificate it signed.
    tls_cert_file: TlsFile = None
    tls_key_file: TlsFile = None
    tls_ca_file: TlsFile = None

    @model_validator(mode="after")
    def _tls_pair(self) -> OrdersSettings:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        return self


class WorklistSettings(Section):
    """A Modality Worklist SCP (C-FIND) to ask for a study's order where no HL7 feed exists: the gateway queries
    it by accession number when a study starts arriving and keeps what it finds as the study's order."""

    scp: Annotated[Peer | None, BeforeValidator(_peer_or_none)] = None  # AET@host:port; none: not asked
    timeout_s: Seconds = 5.0


class UpsSettings(Section):
    """The worklist manager that hears of every analysed study as a DICOM UPS workitem (IHE AIW-I): created,
    claimed, given its outcome and the objects stored (Output Information Sequence), and completed."""

    scp: Annotated[Peer | None, BeforeValidator(_peer_or_none)] = None  # AET@host:port; none: not told
    timeout_s: Seconds = 10.0
    attempts: Annotated[int, Field(ge=1)] = 5
    # The AE title the outputs can be retrieved from (the PACS).
    retrieve_ae_title: Annotated[str, Field(max_length=16)] = ""
    # Accept workitems pushed to the gateway (UPS Push N-CREATE on the receiver's port): the study named in the
    # Input Information Sequence is retrieved by C-GET from its Retrieve AE Title (a configured peer), analysed,
    # and the workitem completed with the objects stored; the manager follows it by N-GET.
    accept_tasks: bool = False
    retrieve_timeout_s: Seconds = 120.0
    # A workitem lists its outputs once they are delivered to the PACS; after this long it goes on regardless.
    delivery_wait_s: Seconds = 600.0


class SmtpSettings(Section):
    """The mail relay that critical-result e-mails go through."""

    host: str = "127.0.0.1"
    port: Port = 25
    sender: str = "ai-gateway@localhost"
    starttls: bool = False
    username: str = ""
    password_file: OptionalPath = None  # a file holding the password (never the password in the settings)
    timeout_s: Seconds = 10.0


class CriticalContact(Section):
    """Who is told of a critical AI finding at one level of the ladder, and how (one or more channels)."""

    level: Annotated[int, Field(ge=1, le=9)]
    name: str  # a role or rota, e.g. "on-call neuroradiologist" (recorded as who was notified)
    sites: tuple[AeTitle | Literal["*"], ...] = ("*",)  # calling AE titles of the sending PACS; "*": any
    email: str = ""
    webhook_url: Annotated[str, AfterValidator(_http_url)] = ""
    hl7: Annotated[str, AfterValidator(_host_port)] = ""  # MLLP host:port of a paging or messaging system

    @model_validator(mode="after")
    def _a_channel(self) -> CriticalContact:
        if not (self.email or self.webhook_url or self.hl7):
            raise ValueError(f"contact {self.name!r} needs at least one of email, webhook_url, hl7")
        if self.email and not re.fullmatch(r"[^@\s]+@[^@\s]+", self.email):
            raise ValueError(f"contact {self.name!r}: {self.email!r} is not an e-mail address")
        return self


class CriticalResultsSettings(Section):
    """Critical results with acknowledgement: a STAT finding notifies the site's level-1 contact once its SR is
    stored; unacknowledged after ``ack_timeout_s``, the next level; never twice per study and level."""

    enabled: bool = False
    ack_timeout_s: Seconds = 600.0
    poll_s: Seconds = 1.0  # how often due escalations are looked for
    # Where a recipient's browser reaches the gateway's HTTP server (the acknowledgement link's base).
    public_url: Annotated[str, AfterValidator(_http_url)] = "http://127.0.0.1:8080"
    # The key that signs acknowledgement links (the same on every node of a cluster); empty: one is made and
    # kept in data_dir (critical-link.key).
    link_secret_file: OptionalPath = None
    link_valid_s: Seconds = 86400.0
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    contacts: tuple[CriticalContact, ...] = ()

    @model_validator(mode="after")
    def _ladder(self) -> CriticalResultsSettings:
        seen: set[tuple[str, int]] = set()
        for contact in self.contacts:
            for site in contact.sites:
                if (site, contact.level) in seen:
                    raise ValueError(f"two contacts at level {contact.level} for site {site!r}")
                seen.add((site, contact.level))
        if self.enabled and not self.contacts:
            raise ValueError("enabled needs at least one [[critical_results.contacts]]")
        return self

    def ladder(self, site: str) -> list[CriticalContact]:
        """The site's contacts by level: per level the one that names the site, else the one for any site."""
        by_level: dict[int, CriticalContact] = {}
        for contact in sorted(self.contacts, key=lambda c: (c.level, "*" in c.sites)):
            if (site in contact.sites or "*" in contact.sites) and contact.level not in by_level:
                by_level[contact.level] = contact
        return [by_level[level] for level in sorted(by_level)]


class ClusterSettings(Section):
    """Several gateways on one PostgreSQL database and one shared spool folder (an NFS or CephFS mount): the job
    queue lives in the database, any node analyses any study, and a node that dies has its studies taken over
    within one lease. Off by default (one gateway: the queue is in memory, rebuilt from the spool on start)."""

    enabled: bool = False
    # The spool every node writes and reads (the same path on every node); empty: data_dir/spool.
    spool_dir: OptionalPath = None
    lease_s: Seconds = 30.0  # a study whose owner has not renewed its lease this long is taken over
    heartbeat_s: Seconds = 5.0  # how often a node renews its leases (well under lease_s)
    poll_s: Seconds = 0.5  # how often an idle worker looks for work that other nodes routed

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> ClusterSettings:
        if self.heartbeat_s * 3 > self.lease_s:
            raise ValueError(
                f"heartbeat_s ({self.heartbeat_s}) must be at most a third of lease_s ({self.lease_s})"
            )
        return self


class LogLevel(Choice):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    CRITICAL = "CRITICAL"


class PreprocessBackend(Choice):
    AUTO = "auto"  # CuPy where a CUDA device works, else numpy
    DALI = "dali"  # the NVIDIA DALI pipeline (GPU when there is one and force_cpu is off, else CPU)


class DecodeBackend(Choice):
    AUTO = "auto"  # nvImageCodec on a GPU for JPEG / JPEG 2000 when installed, pydicom otherwise
    PYDICOM = "pydicom"
    NVIMGCODEC = "nvimgcodec"  # also on the CPU; pydicom takes over any frame it fails on


def _upper_choice(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


REJECT_REASONS = ("false positive", "not clinically relevant", "wrong location", "wrong measurement", "other")


class ReviewSettings(Section):
    """Radiologists' verdicts on AI findings, final reports read against the AI, and drift alarms."""

    reject_reasons: Annotated[tuple[str, ...], Field(min_length=1)] = REJECT_REASONS
    report_rules: ResolvedPath | None = None  # a site's own report rule set; default: the packaged one
    # Drift: CUSUM on the acceptance rate (p0 expected, p1 the fall to detect, h the threshold) and PSI of the
    # score distribution against the silent-mode baseline (alarm above psi_alarm once psi_min_scores are in).
    acceptance_expected: Annotated[float, Field(gt=0, lt=1)] = 0.9
    acceptance_alarm_at: Annotated[float, Field(gt=0, lt=1)] = 0.7
    cusum_threshold: Annotated[float, Field(gt=0)] = 11.0
    psi_alarm: Annotated[float, Field(gt=0)] = 0.25
    psi_min_scores: Annotated[int, Field(ge=10)] = 200
    alarm_webhook_url: Annotated[str, AfterValidator(_http_url)] = ""  # JSON POST per drift alarm
    monitor_interval_s: Seconds = 300.0  # how often model statistics and drift are evaluated
    report_match_interval_s: Seconds = 30.0  # how often reports that came before their analysis are compared

    @model_validator(mode="after")
    def _fall(self) -> ReviewSettings:
        if self.acceptance_alarm_at >= self.acceptance_expected:
            raise ValueError("[review] acceptance_alarm_at must be below acceptance_expected")
        return self


class Settings(Section):
    data_dir: ResolvedPath
    log_level: Annotated[Annotated[LogLevel, LAX], BeforeValidator(_upper_choice)] = LogLevel.INFO
    quiet_period_s: Seconds = 10.0
    # A study whose last association was aborted or had instances refused waits this long for more instances
    # before it is analysed (and its results then say the study may be incomplete).
    incomplete_guard_s: Seconds = 300.0
    workers: Annotated[int, Field(ge=1)] = 2
    # Results (SR, GSPS, SEG) are encoded in this many worker processes, off the interpreter lock that the
    # receiver and the workers share; 0: in the worker threads.
    encode_processes: Annotated[int, Field(ge=0)] = 2
    # STAT results get one more encoder process of their own; the routine ones run this much lower in CPU
    # priority (as `nice`: 0-19), so STAT work is not encoded at the routine flood's share of the CPU.
    encode_routine_nice: Annotated[int, Field(ge=0, le=19)] = 10
    force_cpu: bool = False
    preprocess_backend: Annotated[PreprocessBackend, LAX] = PreprocessBackend.AUTO
    decode_backend: Annotated[DecodeBackend, LAX] = DecodeBackend.AUTO
    stat_webhook_url: Annotated[str, AfterValidator(_http_url)] = ""
    # Optional URL that receives a JSON POST for every routed series that could not be analysed.
    failure_webhook_url: Annotated[str, AfterValidator(_http_url)] = ""
    receiver: ReceiverSettings = Field(default_factory=ReceiverSettings)
    triton: TritonSettings = Field(default_factory=TritonSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    fhir: FhirSettings = Field(default_factory=FhirSettings)
    hl7: Hl7Settings = Field(default_factory=Hl7Settings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    orders: OrdersSettings = Field(default_factory=OrdersSettings)
    worklist: WorklistSettings = Field(default_factory=WorklistSettings)
    critical_results: CriticalResultsSettings = Field(default_factory=CriticalResultsSettings)
    ups: UpsSettings = Field(default_factory=UpsSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    scheduling: SchedulingSettings = Field(default_factory=SchedulingSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    review: ReviewSettings = Field(default_factory=ReviewSettings)
    peers: tuple[Peer, ...] = ()
    pipelines: Annotated[tuple[PipelineSettings, ...], AfterValidator(unique_names)] = ()

    @model_validator(mode="after")
    def _guard_after_quiet_period(self) -> Settings:
        if self.incomplete_guard_s < self.quiet_period_s:
            raise ValueError(
                f"incomplete_guard_s ({self.incomplete_guard_s}) must be >= quiet_period_s ({self.quiet_period_s})"
            )
        return self

    @property
    def spool_dir(self) -> Path:
        if self.cluster.enabled and self.cluster.spool_dir is not None:
            return self.cluster.spool_dir
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

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.data_dir / 'gateway.db'}"

    @property
    def node_id(self) -> str:
        return self.database.node_id or socket.gethostname()[:64]

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


def load_settings(config_file: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build ``Settings`` from the embedded defaults, an optional TOML file and flag overrides.

    ``overrides`` uses the TOML layout (``{"receiver": {"port": 104}}``). ``[[pipelines]]`` and ``[[peers]]``
    in the file replace the defaults as a whole. Relative paths are relative to the config file's folder.
    """
    raw = sources.embedded_defaults()
    base_dir = Path.cwd()
    if config_file is not None:
        raw = sources.merge(raw, sources.read_file(config_file))
        base_dir = Path(config_file).resolve().parent
    if overrides:
        raw = sources.merge(raw, overrides)
    from_env = os.environ.get(DATABASE_URL_ENV, "")
    if from_env and not raw.get("database", {}).get("url"):
        raw = sources.merge(raw, {"database": {"url": from_env}})
    try:
        return Settings.model_validate(sources.freeze(raw), context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(describe(exc, Settings, raw)) from None
