"""qga: a guest agent that is QEMU's guest agent on the wire.

``__version__`` is this project's own version.  ``QEMU_GA_VERSION`` is the
qemu-ga release whose command set and behaviour the core reproduces; it is
what ``guest-info`` and ``-V`` report, because hosts (libvirt, KubeVirt,
scripts) gate features on it.
"""

__version__ = "0.1.0"
QEMU_GA_VERSION = "10.1.0"
