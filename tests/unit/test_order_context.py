"""A study's order context: the HL7 feed's order first, else the worklist (asked once, what it finds kept), never
a cancelled order brought back, and a worklist that is down costs the study only its order."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import Engine

from gateway.config.settings import Peer
from gateway.core.errors import WorklistError
from gateway.workflow.context import OrderContext
from gateway.workflow.hl7v2 import Er7Message
from gateway.workflow.orders import OrderStore, order_from_message
from gateway.workflow.worklist import WorklistLookup, order_from_worklist, worklist_query
from tests.unit.test_hl7v2 import ORM


def _item(accession: str, priority: str = "STAT") -> Dataset:
    item = Dataset()
    item.AccessionNumber = accession
    item.StudyInstanceUID = "1.2.3.4"
    item.PatientID, item.IssuerOfPatientID = "P1", "HOSP"
    item.RequestedProcedurePriority = priority
    code = Dataset()
    code.CodeValue = "CTHEAD"
    item.RequestedProcedureCodeSequence = [code]
    item.RequestedProcedureDescription = "CT head"
    reason = Dataset()
    reason.CodeMeaning = "Head trauma"
    item.ReasonForRequestedProcedureCodeSequence = [reason]
    return item


class FakeFinder:
    """The C-FIND seam (the real SCP, DCMTK wlmscpfs, is in the integration tests): counts the queries."""

    def __init__(self, items: list[Dataset], error: Exception | None = None) -> None:
        self.items, self.error, self.queries = items, error, 0

    def __call__(self, scp: Peer, query: Dataset, **kw: object) -> list[Dataset]:
        self.queries += 1
        assert "PatientName" not in query  # never asked for
        if self.error is not None:
            raise self.error
        return [i for i in self.items if i.AccessionNumber == query.AccessionNumber]


def _context(engine: Engine, finder: FakeFinder) -> OrderContext:
    lookup = WorklistLookup(Peer(ae_title="MWL", port=104), calling_ae="GW", timeout_s=1, finder=finder)
    return OrderContext(OrderStore(engine, "test"), lookup)


def test_a_worklist_match_becomes_the_order_and_is_asked_for_once(engine: Engine) -> None:
    finder = FakeFinder([_item("ACC-1")])
    context = _context(engine, finder)
    order = context.for_study("ACC-1", "1.2.3.4")
    assert order is not None and order.priority == "STAT" and order.procedure_code == "CTHEAD"
    assert order.reason == "Head trauma" and order.message_type == "MWL"
    assert context.for_study("ACC-1", "1.2.3.4") == order and finder.queries == 1  # kept: not asked again
    assert context.for_study("ACC-2", "1.2.3.9") is None and finder.queries == 2
    assert context.for_study("ACC-2", "1.2.3.9") is None and finder.queries == 2  # routing: not asked again


def test_the_hl7_order_comes_first_and_a_cancelled_one_stays_cancelled(engine: Engine) -> None:
    finder = FakeFinder([_item("ACC-0001", priority="LOW")])
    context = _context(engine, finder)
    hl7 = order_from_message(Er7Message(ORM))
    context.store.save(hl7)
    assert context.for_study("ACC-0001", "") == hl7 and finder.queries == 0
    context.store.save(order_from_message(Er7Message(ORM.replace("ORC|NW", "ORC|CA"))))
    assert context.for_study("ACC-0001", "") is None and finder.queries == 0


def test_a_worklist_that_is_down_leaves_the_study_without_an_order(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    finder = FakeFinder([], error=WorklistError("association with worklist MWL@127.0.0.1:104 was rejected"))
    assert _context(engine, finder).for_study("ACC-1", "1.2.3.4") is None
    assert "the worklist could not be asked" in caplog.text


def test_worklist_priorities_and_a_match_without_accession() -> None:
    assert order_from_worklist(_item("A", "HIGH")).priority == "URGENT"  # type: ignore[union-attr]
    assert order_from_worklist(_item("A", "MEDIUM")).priority == "ROUTINE"  # type: ignore[union-attr]
    assert order_from_worklist(_item("")) is None
    query = worklist_query("ACC-9")
    assert query.AccessionNumber == "ACC-9" and query.ScheduledProcedureStepSequence[0].Modality == ""
