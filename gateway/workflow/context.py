"""A study's order context, from wherever the site has it: the HL7 order feed (orders stored as they arrive), else
the Modality Worklist (what it finds is stored like an HL7 order; an accession number it had nothing for is not
asked again for ``UNMATCHED_RETRY_S``, so the lookup at a study's start and the one at its routing cost one query).
Blocking: call from a thread, never from the event loop."""

from __future__ import annotations

import logging
import threading
import time

from gateway.core.errors import GatewayError
from gateway.workflow.orders import Order, OrderStore
from gateway.workflow.worklist import WorklistLookup

logger = logging.getLogger(__name__)
UNMATCHED_RETRY_S = 300.0  # an order the RIS creates after the images arrived is found this much later
UNMATCHED_KEPT = 10_000


class OrderContext:
    def __init__(self, store: OrderStore, worklist: WorklistLookup | None = None) -> None:
        self.store = store
        self.worklist = worklist
        self._unmatched: dict[str, float] = {}  # accession number -> when the worklist had no order for it
        self._lock = threading.Lock()

    def for_study(self, accession_number: str, study_uid: str) -> Order | None:
        """The study's active order; raises only when the system of record cannot be read."""
        order = self.store.for_study(accession_number, study_uid)
        if order is not None or self.worklist is None or not accession_number:
            return order
        if self.store.find(accession_number) is not None:
            return None  # the RIS cancelled it: the worklist does not bring it back
        with self._lock:
            asked = self._unmatched.get(accession_number)
        if asked is not None and time.monotonic() - asked < UNMATCHED_RETRY_S:
            return None
        try:
            order = self.worklist.order(accession_number)
        except GatewayError as exc:  # the worklist is down: the study goes on without its order
            logger.warning("study %s: the worklist could not be asked (%s)", study_uid, exc)
            return None
        if order is None:
            logger.info("study %s: the worklist has no order for its accession number", study_uid)
            with self._lock:
                if len(self._unmatched) >= UNMATCHED_KEPT:
                    self._unmatched.pop(next(iter(self._unmatched)))
                self._unmatched[accession_number] = time.monotonic()
            return None
        self.store.save(order)
        logger.info("study %s: order found in the worklist (priority %s)", study_uid, order.priority)
        return order
