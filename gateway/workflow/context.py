"""A study's order context, from wherever the site has it: the HL7 order feed (orders stored as they arrive), else
the Modality Worklist (asked once per study; what it finds is stored like an HL7 order, so it is asked again only
for a study it knew nothing of). Blocking: call from a thread, never from the event loop."""

from __future__ import annotations

import logging

from gateway.core.errors import GatewayError
from gateway.workflow.orders import Order, OrderStore
from gateway.workflow.worklist import WorklistLookup

logger = logging.getLogger(__name__)


class OrderContext:
    def __init__(self, store: OrderStore, worklist: WorklistLookup | None = None) -> None:
        self.store = store
        self.worklist = worklist

    def for_study(self, accession_number: str, study_uid: str) -> Order | None:
        """The study's active order; raises only when the system of record cannot be read."""
        order = self.store.for_study(accession_number, study_uid)
        if order is not None or self.worklist is None or not accession_number:
            return order
        if self.store.find(accession_number) is not None:
            return None  # the RIS cancelled it: the worklist does not bring it back
        try:
            order = self.worklist.order(accession_number)
        except GatewayError as exc:  # the worklist is down: the study goes on without its order
            logger.warning("study %s: the worklist could not be asked (%s)", study_uid, exc)
            return None
        if order is None:
            logger.info("study %s: the worklist has no order for its accession number", study_uid)
            return None
        self.store.save(order)
        logger.info("study %s: order found in the worklist (priority %s)", study_uid, order.priority)
        return order
