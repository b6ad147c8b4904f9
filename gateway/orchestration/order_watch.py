"""The order behind each arriving study: looked up as soon as the study's first instance is spooled (off the
receiving thread), so that an order that says how many images to expect closes the study the moment they are all
in - not after the quiet period - and a worklist query is done while the images still arrive, not when the study
is routed.

A study that was complete before (a late series re-opens it) is not closed by the count: the count is the
whole study's, the re-opened study holds only what came late, and it waits for its quiet period as before."""

from __future__ import annotations

import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import Engine

from gateway.database.queries import was_complete
from gateway.ingest.assembler import StudyAssembler
from gateway.workflow.context import OrderContext

logger = logging.getLogger(__name__)


class OrderWatch:
    def __init__(self, context: OrderContext, assembler: StudyAssembler, engine: Engine) -> None:
        self.context = context
        self.assembler = assembler
        self.engine = engine
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-orders")

    def attach(self) -> OrderWatch:
        self.assembler.on_new_study = self.study_started
        return self

    def study_started(self, study_uid: str, accession_number: str) -> None:
        """On a receiving thread: queue the lookup, return at once."""
        with contextlib.suppress(RuntimeError):  # stopping: nothing more is looked up
            self._executor.submit(self._look_up, study_uid, accession_number)

    def _look_up(self, study_uid: str, accession_number: str) -> None:
        try:
            order = self.context.for_study(accession_number, study_uid)
            if order is None or not order.expected_images or was_complete(self.engine, study_uid):
                return
        except Exception as exc:  # a database error of any kind: the quiet period still closes the study
            logger.warning("study %s: its order could not be read (%s)", study_uid, type(exc).__name__)
            return
        self.assembler.expect_count(study_uid, order.expected_images, source="order")
        logger.info("study %s: its order expects %d image(s)", study_uid, order.expected_images)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
