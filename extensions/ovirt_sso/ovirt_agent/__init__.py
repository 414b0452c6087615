"""The oVirt guest agent, rebuilt as a qga extension.

VDSM talks to it on the ``ovirt-guest-agent.0`` virtio-serial port (legacy
``com.redhat.rhevm.vdsm``), which the qga core relays to this process.  The
modules, from the wire up:

:mod:`.messages`    names, API version gating, string filtering, line encoding,
                    the 1 MiB line limit, host command parsing (sans-IO)
:mod:`.config`      the original agent's settings and defaults
:mod:`.scheduler`   the 1-second loop's counters (sans-IO, any clock)
:mod:`.logic`       what to send when: startup set, timers, refresh burst,
                    version negotiation, host commands (sans-IO)
:mod:`.collectors`  the data: /proc, psutil, dpkg/rpm, statvfs, os-release, ...
:mod:`.actions`     power and session actions, through core primitives
:mod:`.hooks`       lifecycle hooks (hooks.d/<event>/*) run one after the other
:mod:`.dbus`        a minimal D-Bus client (SASL EXTERNAL, calls, signals)
:mod:`.logind`      session logon/logoff/lock/unlock from systemd-logind
:mod:`.relay`       the same protocol through guest-extension-call/-events
:mod:`.runner`      the IO: the SDK's loop, the channel, timers, the relay

Everything here runs on the guest's Python (3.9 or later), with the
standard library and, where present, psutil.
"""
