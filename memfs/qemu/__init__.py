"""The qemu layer: a trio QMP client, QEMU process control, the test guest."""

from .qmp import QMP, QMPClosed, QMPError
from .vm import VM, Console, VMConfig, file_backend, longest_gap, memfd_backend, qemu_binary

__all__ = ["QMP", "QMPClosed", "QMPError", "VM", "Console", "VMConfig", "file_backend",
           "longest_gap", "memfd_backend", "qemu_binary"]
