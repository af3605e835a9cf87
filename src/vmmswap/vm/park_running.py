"""Park a running VM under vmm-swap: its memory goes to the store from where it lies.

``vmmswap park`` of a fresh guest snapshots it to a local directory and uploads that. A VM under
vmm-swap has most of its memory in staging and in the swap file; copying it back into RAM to
snapshot it would undo the swap-out. Here, with every vCPU held at its safe point
(:func:`~vmmswap.vm.snapshot.held_vcpus`), the monitor detaches
(:meth:`SwapController.detached <vmmswap.control.controller.SwapController.detached>`) and the
memory file is read straight from the data plane -- resident pages from the guest memfds,
staged ones from staging, swapped ones from the swap file -- into content-addressed chunks, the
state file beside them, the manifest last (:func:`~vmmswap.storage.upload.upload_memory`).

Committed, the VM is stopped: its vCPUs leave from their safe point, the controller releases
everything without swapping in. Any failure before the manifest is stored (store unreachable,
a chunk refused, the state not capturable) calls the park off: a successor monitor resumes
from the kept page state and the vCPUs go on where they were; the error is raised.
"""

from __future__ import annotations

import time
from typing import Any

from vmmswap.control.controller import SwapController
from vmmswap.storage.store import open_store
from vmmswap.storage.upload import upload_memory
from vmmswap.vm.micro import MicroVM
from vmmswap.vm.snapshot import GUEST_KIND, STATE_FILE, held_vcpus, memory_regions
from vmmswap.vm.vm_state import encode_state

__all__ = ["park_running"]


def park_running(vm: MicroVM, controller: SwapController, url: str, *,
                 guest: dict[str, Any] | None = None, workers: int = 8,
                 files: dict[str, bytes] | None = None) -> dict[str, Any]:
    """Park ``vm`` (under ``controller``) as the snapshot at ``url``; its figures. On success the
    VM is stopped and ``controller`` parked; on any error both run on as before."""
    store, prefix = open_store(url)
    before = controller.status()
    t0 = time.monotonic()
    with held_vcpus(vm) as held, controller.detached() as memory:
        image = memory.image
        regions = memory_regions(vm.memory)

        def opcode_at(guest_addr: int) -> int:
            region = vm.memory.region_of(guest_addr)
            offset = next(r.file_offset for r in regions if r.guest_addr == region.guest_addr)
            at = offset + guest_addr - region.guest_addr
            page = bytearray(4096)
            image.read_into(at - at % 4096, memoryview(page))
            return page[at % 4096]

        held.check(vm.memory, opcode_at)
        state = held.vm_state(vm, regions, {"kind": GUEST_KIND, **(guest or {})})
        stored = {STATE_FILE: encode_state(state), **(files or {})}
        manifest, stats = upload_memory(store, prefix, image, workers=workers, files=stored,
                                        regions=[(r.file_offset, r.size) for r in regions])
        memory.commit()
        vm.machine.request_stop("parked: the VM's memory and state are in the store")
        paused = time.monotonic() - held.started
    return {"url": url, "memory_bytes": manifest.size, "stored_bytes": manifest.stored_bytes(),
            "state_before": str(before.state),
            "resident_pages_before": before.metrics.resident_pages,
            "read_from": {"memory": image.counts.memory, "staging": image.counts.staging,
                          "swap_file": image.counts.swap_file},
            "paused_seconds": round(paused, 3), "seconds": round(time.monotonic() - t0, 3),
            **stats.as_dict()}
