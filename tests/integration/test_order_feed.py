"""The RIS's order feed: real HL7 v2 messages over real MLLP connections to the gateway's listener, on both
database backends. Every message gets the acknowledgement MSH-15 asks for; an accepted order is in the system of
record before its ACK; garbage, unknown types and orders without an accession number are answered with the
reason, never a crash or a silent drop; a database that is down answers AE (the RIS sends again)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.config.settings import load_settings
from gateway.database import migrate
from gateway.database.connect import engine_for
from gateway.inference.server import free_port
from gateway.workflow.hl7v2 import Er7Message
from gateway.workflow.orders import OrderStore
from tests.support.postgres import PostgresCluster
from tests.unit.test_hl7v2 import OMI, ORM

START, END = b"\x0b", b"\x1c\x0d"


class MllpClient:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def send(self, message: str | bytes) -> None:
        body = message.encode() if isinstance(message, str) else message
        self.sock.sendall(START + body + END)

    def ack(self, timeout_s: float = 10.0) -> str | None:
        self.sock.settimeout(timeout_s)
        data = b""
        try:
            while not data.endswith(END):
                chunk = self.sock.recv(65536)
                if not chunk:
                    return None
                data += chunk
        except TimeoutError:
            return None
        return data[1:-2].decode()

    def exchange(self, message: str | bytes) -> str | None:
        self.send(message)
        return self.ack()

    def close(self) -> None:
        self.sock.close()


def msa(ack: str | None) -> list[str]:
    assert ack is not None, "no acknowledgement"
    return next(s for s in ack.split("\r") if s.startswith("MSA")).split("|")


@pytest.fixture
def gateway(tmp_path: Path, database_url: str) -> Gateway:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[receiver]\nport = {free_port()}\n[http]\nenabled = false\n'
        f'[triton]\nurl = "127.0.0.1:1"\n[database]\nurl = "{database_url}"\n'
        f"[orders]\nenabled = true\nport = 0\n"
    )
    gateway = Gateway(load_settings(config)).start()
    yield gateway
    gateway.stop()


def test_orders_are_stored_before_their_ack_and_every_message_is_answered(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    assert gateway.orders_listener is not None
    store = OrderStore(gateway.database, "test")
    client = MllpClient(gateway.orders_listener.port)
    try:
        ack = client.exchange(ORM)
        assert msa(ack)[1:3] == ["AA", "MSG0001"]
        order = store.find("ACC-0001")  # already committed when the ACK arrived
        assert order is not None and (order.priority, order.status) == ("STAT", "active")
        assert order.reason == "Sudden headache & vomiting" and order.procedure_code == "CTHEAD"

        assert msa(client.exchange(OMI))[1] == "CA"  # MSH-15 = AL: enhanced accept acknowledgement
        omi = store.find("ACC-0002")
        assert omi is not None and omi.study_uid == "1.2.826.0.1.3680043.10.7.1" and omi.priority == "URGENT"

        cancel = ORM.replace("ORC|NW", "ORC|CA").replace("MSG0001", "MSG0003")
        assert msa(client.exchange(cancel))[1] == "AA"
        cancelled = store.find("ACC-0001")
        assert cancelled is not None and cancelled.status == "cancelled"

        adt = "MSH|^~\\&|RIS|HOSP|AI_GATEWAY|HOSP|20261202||ADT^A08|MSG0004|P|2.5\rPID|1||PAT1^^^HOSP||DOE^JANE\r"
        assert msa(client.exchange(adt))[1] == "AA"

        unknown = ORM.replace("ORM^O01", "SIU^S12").replace("MSG0001", "MSG0005")
        ack = client.exchange(unknown)
        assert msa(ack)[1] == "AR"
        assert Er7Message(ack or "").get("ERR", 8) == "message type SIU^S12 is not taken here"
        # A report is taken (test_final_reports.py); this one has no text, so it is an error, not a rejection.
        textless = ORM.replace("ORM^O01", "ORU^R01").replace("MSG0001", "MSG0006")
        ack = client.exchange(textless)
        assert msa(ack)[1] == "AE" and "no report text" in str(ack)

        no_accession = ORM.replace("ACC-0001", "").replace("|PLC1|FIL1|CTHEAD", "|PLC1||CTHEAD")
        ack = client.exchange(no_accession.replace("MSG0001", "MSG0006"))
        assert msa(ack)[1] == "AE" and Er7Message(ack or "").get("ERR", 8).startswith("no accession number")

        ack = client.exchange(b"\xff\xfe not hl7 at all")
        assert msa(ack)[1] == "AR"

        never = OMI.replace("|2.5|||AL", "|2.5|||NE").replace("ACC-0002", "ACC-0007")
        client.send(never)  # MSH-15 = NE: stored, no acknowledgement
        assert client.ack(timeout_s=1.0) is None
        assert store.find("ACC-0007") is not None

        assert (
            msa(client.exchange(ORM.replace("MSG0001", "MSG0008")))[1] == "AA"
        )  # the connection still serves
    finally:
        client.close()
    assert "DOE" not in caplog.text and "JANE" not in caplog.text and "PAT123" not in caplog.text
    events = [e["event"] for e in gateway.audit.read() if e["event"].startswith("hl7_")]
    assert (
        events.count("hl7_accepted") == 6
        and events.count("hl7_rejected") == 2
        and events.count("hl7_error") == 2  # no accession; a report without text
    )


def test_a_half_frame_or_a_silent_client_never_stops_the_listener(gateway: Gateway) -> None:
    assert gateway.orders_listener is not None
    port = gateway.orders_listener.port
    half = socket.create_connection(("127.0.0.1", port), timeout=5)
    half.sendall(START + b"MSH|^~\\&|RIS|")  # and then nothing
    silent = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        client = MllpClient(port)
        assert msa(client.exchange(ORM))[1] == "AA"
        client.close()
    finally:
        half.close()
        silent.close()


def test_with_the_database_down_an_order_is_answered_ae_so_the_ris_sends_it_again(
    tmp_path: Path, postgres: PostgresCluster
) -> None:
    url = postgres.create_database()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[receiver]\nport = {free_port()}\n[http]\nenabled = false\n'
        f'[triton]\nurl = "127.0.0.1:1"\n[database]\nurl = "{url}"\n[orders]\nenabled = true\nport = 0\n'
    )
    gateway = Gateway(load_settings(config)).start()
    try:
        assert gateway.orders_listener is not None
        client = MllpClient(gateway.orders_listener.port)
        postgres.stop()
        try:
            ack = client.exchange(ORM)
            assert msa(ack)[1] == "AE" and "send it again" in (ack or "")
        finally:
            postgres.restart()
        deadline = time.time() + 30
        while msa(ack := client.exchange(ORM))[1] != "AA" and time.time() < deadline:
            time.sleep(0.5)
        assert msa(ack)[1] == "AA"
        client.close()
        engine = engine_for(url)
        assert migrate.current(engine) == migrate.head()
        assert OrderStore(engine, "t").find("ACC-0001") is not None
        engine.dispose()
    finally:
        gateway.stop()


def test_the_order_priority_puts_a_routine_looking_study_first(tmp_path: Path, triton: str) -> None:
    """The images say nothing of urgency; the RIS's order for their accession number says STAT: the study is
    scheduled (and recorded) as STAT."""
    from gateway.database.queries import StudyFilter, list_studies
    from gateway.demo.phantoms import write_head_ct
    from tests.support.servers import storescu, wait_for

    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\nquiet_period_s = 0.5\nworkers = 1\n[receiver]\nport = {port}\n'
        f'[http]\nenabled = false\n[triton]\nurl = "{triton}"\n[orders]\nenabled = true\nport = 0\n'
        '[[pipelines]]\nname = "ct"\nmodel = "ct_head_hyperdensity"\nalgorithm_version = "0.1.0"\n'
        'modalities = ["CT"]\ninput_size = [256, 256]\n[pipelines.labels]\n0 = "hemorrhage"\n'
    )
    series = write_head_ct(
        tmp_path / "s", slices=6, rows=128, cols=128, seed=3
    )  # AccessionNumber ACC-PHANTOM-1
    gateway = Gateway(load_settings(config)).start()
    try:
        assert gateway.orders_listener is not None
        client = MllpClient(gateway.orders_listener.port)
        assert msa(client.exchange(ORM.replace("ACC-0001", "ACC-PHANTOM-1")))[1] == "AA"
        client.close()
        assert storescu(list(series.paths), port=port, calling_ae="STORESCU").returncode == 0
        [row] = wait_for(
            lambda: list_studies(gateway.database, StudyFilter(state="results_stored")),
            timeout_s=120,
            what="the study to be analysed",
        )
    finally:
        gateway.stop()
    assert row.priority == "STAT"


def _completed_at(gateway: Gateway, study_uid: str) -> float:
    from gateway.database.queries import study_timeline
    from tests.support.servers import wait_for

    def complete() -> float | None:
        timeline = study_timeline(gateway.database, study_uid)
        steps = [s.at for s in timeline.steps if s.stage == "complete"] if timeline else []
        return steps[0] if steps else None

    return float(wait_for(complete, timeout_s=25, what="the study to be complete"))


def test_an_order_that_says_how_many_images_closes_the_study_at_the_last_one(
    gateway: Gateway, tmp_path: Path
) -> None:
    """The order (OBR-37) expects 6 images: the study is complete as soon as the sixth is in the spool, not after
    the 30 s quiet period; an order without a count leaves the quiet period in charge."""
    from gateway.demo.phantoms import write_head_ct
    from tests.support.servers import storescu

    gateway.assembler.quiet_period_s = 30.0
    gateway.assembler.incomplete_guard_s = 30.0
    assert gateway.orders_listener is not None
    client = MllpClient(gateway.orders_listener.port)
    counted = ORM.replace("ACC-0001", "ACC-PHANTOM-1").replace(
        "^Sudden headache \\T\\ vomiting", "|" * 6 + "6"
    )
    assert msa(client.exchange(counted))[1] == "AA"
    client.close()
    order = OrderStore(gateway.database, "test").find("ACC-PHANTOM-1")
    assert order is not None and order.expected_images == 6
    series = write_head_ct(tmp_path / "s", slices=6, rows=64, cols=64, seed=5)
    assert (
        storescu(list(series.paths), port=gateway.settings.receiver.port, calling_ae="STORESCU").returncode
        == 0
    )
    sent = time.time()
    completed = _completed_at(gateway, series.study_uid)
    assert completed - sent < 5.0, "closed by the order's count, not the 30 s quiet period"
    late = gateway.assembler.pending_studies()
    assert late == 0
    print(
        f"\norder count: study complete {completed - sent:.2f} s after the last of its 6 images was acknowledged"
    )


def test_without_an_hl7_feed_the_worklist_gives_the_order_its_priority_and_procedure(
    tmp_path: Path, triton: str
) -> None:
    """No HL7 feed; DCMTK's wlmscpfs holds the worklist. The study's images say ROUTINE and a head pipeline that
    routes only by the ordered procedure: the worklist's STAT order for the accession number is found by C-FIND,
    stored, and the study is routed by its procedure code and analysed as STAT."""
    from pydicom.dataset import Dataset

    from gateway.database.queries import StudyFilter, list_studies
    from gateway.demo.phantoms import write_head_ct
    from tests.support.servers import WorklistSCP, storescu, wait_for

    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "CTHEAD", "L", "CT head"
    port = free_port()
    with WorklistSCP(tmp_path / "worklist") as worklist:
        worklist.add_item(
            "order1",
            AccessionNumber="ACC-PHANTOM-1",
            RequestedProcedurePriority="STAT",
            RequestedProcedureCodeSequence=[code],
            ReasonForTheRequestedProcedure="Fall on anticoagulants",
        )
        worklist.add_item("other", AccessionNumber="ACC-OTHER", RequestedProcedurePriority="LOW")
        config = tmp_path / "gateway.toml"
        config.write_text(
            f'data_dir = "{tmp_path / "data"}"\nquiet_period_s = 0.5\nworkers = 1\n[receiver]\nport = {port}\n'
            f'[http]\nenabled = false\n[triton]\nurl = "{triton}"\n'
            f'[worklist]\nscp = "{worklist.aet}@127.0.0.1:{worklist.port}"\n'
            '[[pipelines]]\nname = "ct"\nmodel = "ct_head_hyperdensity"\nalgorithm_version = "0.1.0"\n'
            'modalities = ["CT"]\nbody_parts = ["KNEE"]\nprocedure_codes = ["CTHEAD"]\n'
            'input_size = [256, 256]\n[pipelines.labels]\n0 = "hemorrhage"\n'
        )
        series = write_head_ct(tmp_path / "s", slices=6, rows=128, cols=128, seed=3)
        gateway = Gateway(load_settings(config)).start()
        try:
            assert storescu(list(series.paths), port=port, calling_ae="STORESCU").returncode == 0
            [row] = wait_for(
                lambda: list_studies(gateway.database, StudyFilter(state="results_stored")),
                timeout_s=120,
                what="the study to be analysed",
            )
            order = OrderStore(gateway.database, "test").find("ACC-PHANTOM-1")
            rules = [e.get("rule") for e in gateway.audit.read() if e["event"] == "series_analysed"]
        finally:
            gateway.stop()
    assert row.priority == "STAT"
    assert order is not None and order.message_type == "MWL" and order.procedure_code == "CTHEAD"
    assert order.reason == "Fall on anticoagulants" and order.priority == "STAT"
    assert rules == ["modality CT, ordered procedure CTHEAD"], rules


def test_the_order_feed_over_mutual_tls(tmp_path: Path) -> None:
    """MLLP over TLS with client certificates: the RIS's certificate gets its ACK; no certificate, or plain TCP,
    gets no acknowledgement and stores nothing."""
    import ssl

    from tests.support.pki import make_pki

    pki = make_pki(tmp_path / "pki")
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[receiver]\nport = {free_port()}\n[http]\nenabled = false\n'
        f'[triton]\nurl = "127.0.0.1:1"\n[orders]\nenabled = true\nport = 0\n'
        f'tls_cert_file = "{pki["server.pem"]}"\ntls_key_file = "{pki["server.key"]}"\n'
        f'tls_ca_file = "{pki["ca.pem"]}"\n'
    )
    gateway = Gateway(load_settings(config)).start()
    try:
        assert gateway.orders_listener is not None
        port = gateway.orders_listener.port
        store = OrderStore(gateway.database, "test")

        def exchange(context: ssl.SSLContext | None, message: str) -> str | None:
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            try:
                sock = context.wrap_socket(raw, server_hostname="127.0.0.1") if context else raw
            except (ssl.SSLError, OSError):
                raw.close()
                return None
            client = MllpClient.__new__(MllpClient)
            client.sock = sock
            try:
                client.send(message)
                return client.ack(timeout_s=5)
            except (ssl.SSLError, OSError):
                return None
            finally:
                sock.close()

        mutual = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca.pem"]))
        mutual.load_cert_chain(str(pki["client.pem"]), str(pki["client.key"]))
        assert msa(exchange(mutual, ORM))[1] == "AA"
        assert store.find("ACC-0001") is not None
        anonymous = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca.pem"]))
        assert exchange(anonymous, ORM.replace("ACC-0001", "ACC-NOCERT")) is None
        assert exchange(None, ORM.replace("ACC-0001", "ACC-PLAIN")) is None
        assert store.find("ACC-NOCERT") is None and store.find("ACC-PLAIN") is None
    finally:
        gateway.stop()
