"""A monitor process started with ``posix_spawn``, and the part of ``Popen`` the controller uses.

Why not ``subprocess.Popen``: Popen learns whether the ``exec`` succeeded through a pipe whose
write end the child holds until its ``exec``. A device process that the VMM forks at that moment
gets a copy of it (``fork`` copies every descriptor, close-on-exec or not, and a device never
execs) and keeps it open, so Popen waits until the *device* exits. If that device waits for a
fault to be served while the monitor is dead, the thread stuck in Popen is the very one that
would start the successor: a deadlock. The torture harness found it (a hang with the VMM's
workers and a device in ``handle_userfault``, the killed monitor a zombie nobody reaped, the
controller's watch thread reading that pipe while starting a spare). glibc's ``posix_spawn``
reports a failed ``exec`` without any descriptor (the child shares the parent's memory until
then, ``CLONE_VFORK``), so nothing can leak into a concurrently forked child.

The one descriptor the monitor needs (its control socket) reaches it as a ``dup2`` in the
spawn's file actions, onto a number the child owns: it is never made inheritable in the VMM,
where another thread's ``exec`` could take it along.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence

__all__ = ["MonitorProcess"]


class MonitorProcess:
    """A spawned child: ``pid``, ``poll``, ``wait`` and ``kill``, with Popen's meanings
    (``returncode`` is the exit status, or minus the signal that killed it)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        #: Held while reaping (a blocking wait holds it); the pidfd's own lock only while it
        #: is used or closed, so kill() never waits for a wait().
        self._lock = threading.Lock()
        self._fd_lock = threading.Lock()
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except OSError:
            self._pidfd = None  # already reaped by someone else: poll() says so

    @classmethod
    def spawn(cls, argv: Sequence[str], env: Mapping[str, str], *, pass_fd: int,
              target_fd: int) -> MonitorProcess:
        """Run ``argv`` (its first word looked up in PATH) with ``env``, stdin and stdout
        on /dev/null, stderr the VMM's, in a session of its own, and ``pass_fd`` as its
        ``target_fd`` (every other descriptor of the VMM is close-on-exec). OSError if it
        cannot be started."""
        if target_fd in (pass_fd, 0, 1, 2):
            raise ValueError(f"target_fd {target_fd} must differ from {pass_fd} and 0-2")
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_DUP2, pass_fd, target_fd),
        ]
        # The child gets default signal handling for everything Python changed (SIGPIPE).
        defaults = {signal.SIGPIPE, signal.SIGXFSZ} if hasattr(signal, "SIGXFSZ") else {
            signal.SIGPIPE}
        pid = os.posix_spawnp(argv[0], list(argv), dict(env), file_actions=actions,
                              setsid=True, setsigdef=defaults)
        return cls(pid)

    def poll(self) -> int | None:
        """The return code if the child has exited (reaping it), else None."""
        with self._lock:
            return self._reap(os.WNOHANG)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the child to exit; subprocess.TimeoutExpired after ``timeout`` s."""
        if self.returncode is not None:
            return self.returncode
        if timeout is not None and self._pidfd is not None:
            poller = select.poll()
            poller.register(self._pidfd, select.POLLIN)
            if not poller.poll(max(0.0, timeout) * 1000):
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
        with self._lock:
            code = self._reap(0)
        assert code is not None
        return code

    def kill(self) -> None:
        """SIGKILL it (through its pidfd: never a recycled pid); nothing if it is gone."""
        with self._fd_lock:
            if self.returncode is not None:
                return
            try:
                if self._pidfd is not None:
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                else:
                    os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _reap(self, flags: int) -> int | None:
        if self.returncode is not None:
            return self.returncode
        try:
            pid, status = os.waitpid(self.pid, flags)
        except ChildProcessError:
            # Reaped elsewhere (a SIGCHLD handler set to SIG_IGN, say): the status is lost.
            self._done(255)
            return self.returncode
        if pid == 0:
            return None
        self._done(os.waitstatus_to_exitcode(status))
        return self.returncode

    def _done(self, code: int) -> None:
        with self._fd_lock:
            self.returncode = code
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None

    def __repr__(self) -> str:
        return f"<MonitorProcess pid={self.pid} returncode={self.returncode}>"
