"""The controller's helper thread: the monitor's death, and the device uffds the VMM keeps.

One epoll over the current monitor's pidfd, the keeper socket (each device's uffd and pidfd,
sent by the monitor when it registers the device) and the pidfd of every device kept. The VMM
must learn of the monitor's death when it happens -- its vCPUs may all be blocked in faults and
never make another request -- and a successor must be started from here for the same reason.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections.abc import Callable

#: Called with the death's time; returns the successor's pid to watch next, or None to stop.
DeathHandler = Callable[[float], "int | None"]
#: Called with None when the keeper socket is readable (returns the new device pidfds), or
#: with a device's pidfd when that device exited.
DeviceHandler = Callable[["int | None"], "list[int]"]


class MonitorWatch:
    def __init__(self, pid: int, keeper_fd: int | None, on_death: DeathHandler,
                 on_device: DeviceHandler) -> None:
        self._pidfd = os.pidfd_open(pid)  # close-on-exec, like every pidfd
        self._keeper = keeper_fd
        self._stop_r, self._stop_w = os.pipe()
        self._stopped = False
        self._stop_lock = threading.Lock()
        self._on_death = on_death
        self._on_device = on_device
        self._devices: set[int] = set()
        self._thread = threading.Thread(target=self._run, name=f"vmmswap-monitor-{pid}-watch",
                                        daemon=True)
        self._thread.start()

    def set_keeper(self, fd: int) -> None:
        """The successor's keeper socket (called on this thread, from ``on_death``)."""
        self._keeper = fd

    def _run(self) -> None:
        with select.epoll() as ep:
            ep.register(self._pidfd, select.EPOLLIN)
            ep.register(self._stop_r, select.EPOLLIN)
            keeper = self._keeper
            if keeper is not None:
                ep.register(keeper, select.EPOLLIN)
            while True:
                ready = {fd for fd, _ in ep.poll()}
                if self._stop_r in ready:
                    return
                if keeper is not None and keeper in ready:
                    for pidfd in self._on_device(None):
                        ep.register(pidfd, select.EPOLLIN)
                        self._devices.add(pidfd)
                for pidfd in ready & self._devices:
                    ep.unregister(pidfd)
                    self._devices.discard(pidfd)
                    self._on_device(pidfd)
                if self._pidfd not in ready:
                    continue
                died_at = time.monotonic()
                ep.unregister(self._pidfd)
                os.close(self._pidfd)
                self._pidfd = -1
                if keeper is not None:
                    with contextlib.suppress(OSError):
                        ep.unregister(keeper)
                    keeper = None
                successor = self._on_death(died_at)
                if successor is None:
                    return
                try:
                    self._pidfd = os.pidfd_open(successor)
                except OSError:  # gone already: it is seen as one more death at once
                    self._pidfd = -1
                    successor = self._on_death(time.monotonic())
                    if successor is None:
                        return
                    self._pidfd = os.pidfd_open(successor)
                ep.register(self._pidfd, select.EPOLLIN)
                keeper = self._keeper
                if keeper is not None:
                    ep.register(keeper, select.EPOLLIN)
                # Devices the predecessor registered just before it died came with the
                # drain in on_death; watch their pidfds too.
                for pidfd in self._on_device(None):
                    ep.register(pidfd, select.EPOLLIN)
                    self._devices.add(pidfd)

    def is_current_thread(self) -> bool:
        return self._thread is threading.current_thread()

    def stop(self) -> None:
        """Stop watching (an orderly close is not a death). Idempotent and thread-safe: the
        death callback itself may close the controller while the VMM's thread does too."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
            os.write(self._stop_w, b"x")
            if self._thread is not threading.current_thread():
                self._thread.join(timeout=10)
            for fd in (self._stop_w, self._stop_r):
                os.close(fd)
            if self._pidfd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self._pidfd)
                self._pidfd = -1
