"""A successor handler finishing or undoing the one step a dead handler left half done.

The journal (:mod:`.page_state`) names at most one multi-array step in progress: a swap-out
chunk, a trim's freeing of zero pages' slots, or a REMOVE. Every rule here follows from the
write order of that step (DESIGN.md, "Crash consistency"), and each is idempotent, so a
successor killed in the middle of it is finished by the next one the same way:

* **swap-out**: a slot is used exactly when its page names it, and pages whose file copy
  became current leave staging (the two copies are identical);
* **freeing slots** (trim's zero pages): the slots are freed and the pages leave staging;
* **REMOVE**: done again whole.

Cost: the journal's pages (at most JOURNAL_CAPACITY), never a scan of every page.
"""

from __future__ import annotations

import logging

import numpy as np

from vmmswap.dataplane.page_state import Journal, JournalOp, PageStateError
from vmmswap.dataplane.staging import StagingMemory
from vmmswap.dataplane.swap_file import SwapFile

__all__ = ["finish_journal"]

_log = logging.getLogger(__name__)


def finish_journal(journal: Journal, swap_file: SwapFile, staging: StagingMemory) -> None:
    """Finish or undo the step ``journal`` names, then clear it. PageStateError (nothing
    changed) for a step this code does not know."""
    op, n = journal.op, journal.count
    pages = journal.pages[:n].astype(np.int64)
    slots = journal.slots[:n].astype(np.int64)
    if op == JournalOp.SWAP_OUT:
        released = swap_file.reconcile_slots(pages, slots)
        done = pages[swap_file.current.test(pages) & staging.present.test(pages)]
        staging.clear_pages(done)
        _log.info("resumed a swap-out step: %d of %d pages were committed, %d slots "
                  "released", done.size, n, released)
    elif op == JournalOp.FREE_SLOTS:
        swap_file.free_pages(pages)
        swap_file.reconcile_slots(pages, slots)
        staging.clear_pages(pages[staging.present.test(pages)])
        _log.info("resumed a trim step: %d zero pages", n)
    elif op == JournalOp.REMOVE:
        first, last = journal.range
        swap_file.free_range(first, last)
        staging.clear_range(first, last)
        _log.info("resumed a REMOVE of pages [%d, %d)", first, last)
    elif op != JournalOp.NONE:
        raise PageStateError(f"the page state's journal names an unknown step {op}")
    journal.clear()
