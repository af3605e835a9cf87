"""Debian's memtest86+ as a guest of the micro-VM: an independent memory checker under vmm-swap."""
