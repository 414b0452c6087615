"""The protocol's own commands: synchronisation, ping, agent information.

These run even while filesystems are frozen and must stay cheap: hosts call
guest-ping and guest-sync constantly to see whether the agent is there.
"""

from __future__ import annotations

from qga import QEMU_GA_VERSION
from qga.commands import command
from qga.log import audit


@command("guest-sync")
def sync(ctx, id):  # noqa: A002 - the QAPI member is called "id"
    """Echo ``id``; the host discards replies until it sees its own."""
    return id


@command("guest-sync-delimited")
def sync_delimited(ctx, id):  # noqa: A002
    """Echo ``id`` in a reply that starts with one 0xFF byte."""
    ctx.delimit_next_reply()
    return id


@command("guest-ping")
def ping(ctx):
    """Answer ``{}``: the agent is alive."""
    audit("guest-ping called")  # qemu-ga's syslog line; the other three log nothing
    return None


@command("guest-info")
def info(ctx):
    """The version hosts gate features on, and every registered command."""
    return {"version": QEMU_GA_VERSION, "supported_commands": ctx.dispatcher.command_infos()}
