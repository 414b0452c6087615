"""The protocol reference page, ``qga-ref(7)``, made from ``qapi-schema.json``.

Run ``python3 -m qga.docs [-o FILE] [SCHEMA]`` (the Makefile does, at build
time): every command the agent registers on Linux, in schema order, with its
arguments, its reply, the release it appeared in and its documentation,
then every type those commands use.  The page is made, not written, so it
can never disagree with the schema the agent runs.

The output is plain man(7) roff and does not change from one run to the
next for the same schema (no dates), so packagers get reproducible builds.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, Dict, Iterable, List, Optional

import qga
from qga.schema import LINUX_DEFINES, SCHEMA_PATH, Schema, condition_holds

_KINDS = ("struct", "enum", "union", "alternate")

_PROTOCOL = r"""
.SH PROTOCOL
The host writes JSON requests on the channel;
the agent answers each with one line of ASCII JSON.
.PP
.EX
{"execute": "guest\-get\-time", "id": 1}
{"return": 1700000000123456000, "id": 1}
.EE
.PP
.B arguments
holds the command's arguments as an object;
.B id
(any JSON value) is echoed in the reply.
A failure answers
.BR "{\(dqerror\(dq: {\(dqclass\(dq: \(dqGenericError\(dq, \(dqdesc\(dq: ...}}" ;
an unknown or disabled command has the class
.BR CommandNotFound .
Requests are framed by their JSON structure, not by lines.
A 0xFF byte from the host drops whatever was half received;
.B guest\-sync\-delimited
answers with a 0xFF byte before its reply, so a client can find the start
of a fresh reply in a stream left dirty by an earlier client.
Commands marked
.I no reply on success
answer only when they fail.
"""


def escape(text: str) -> str:
    """Text safe inside a roff line: backslashes, minus signs, leading dots."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text[:1] in (".", "'") else text


def _text_lines(doc: str) -> List[str]:
    """A doc string as roff lines: paragraphs kept, @member in italics."""
    lines: List[str] = []
    for paragraph in re.split(r"\n\s*\n", doc.strip()):
        if lines:
            lines.append(".PP")
        for line in paragraph.split("\n"):
            line = line.strip()
            if line:
                lines.append(_italic_members(escape(line)))
    return lines


def _italic_members(line: str) -> str:
    return re.sub(r"@([A-Za-z0-9_]+(?:\\-[A-Za-z0-9_]+)*)", r"\\fI\1\\fP", line)


def type_name(type_ref: Any) -> str:
    if isinstance(type_ref, list):
        return f"array of {type_name(type_ref[0])}"
    return str(type_ref)


class ReferencePage:
    """Builds the page for one schema document and one platform."""

    def __init__(self, document: Dict[str, Any], defines=LINUX_DEFINES):
        self.document = document
        self.defines = defines
        self.schema = Schema(document, defines)
        self.lines: List[str] = []

    def render(self) -> str:
        version = qga.__version__
        self.lines = [
            ".\\\" Made by qga/docs.py from qapi-schema.json; do not edit.",
            f'.TH QGA\\-REF 7 "qga {version}" "qga {version}" "qga protocol reference"',
            ".SH NAME",
            "qga\\-ref \\- the commands of the qga guest agent (the qemu\\-ga protocol)",
            ".SH DESCRIPTION",
            "The commands",
            ".BR qga (8)",
            "answers on Linux, with the arguments they take and the values they",
            "return, as in QEMU's guest agent protocol; see",
            ".BR qemu\\-ga\\-ref (7).",
            "Arguments marked",
            ".I optional",
            "may be left out.",
        ]
        self.lines.extend(_PROTOCOL.strip("\n").split("\n"))
        self.lines.append(".SH COMMANDS")
        for name in self.schema.command_names():
            self._command(name)
        self.lines.append(".SH TYPES")
        for name in self._types_used():
            self._type(name)
        self.lines += [".SH SEE ALSO", ".BR qga (8),", ".BR qga\\-client (1),",
                       ".BR qemu\\-ga\\-ref (7)"]
        return "\n".join(self.lines) + "\n"

    # -- commands --------------------------------------------------------------

    def _command(self, name: str) -> None:
        command = self.schema.command(name)
        self.lines.append(f".SS {escape(name)}")
        self.lines.extend(_text_lines(command.doc))
        members = self.schema.command_members(name)
        if members:
            self.lines += [".PP", "Arguments:"]
            self._members(members)
        self.lines.append(".PP")
        if command.returns is not None:
            self.lines.append(f"Returns: \\fB{escape(type_name(command.returns))}\\fP")
        else:
            self.lines.append("Returns: nothing (an empty object)")
        if not command.success_response:
            self.lines += [".br", "\\fIno reply on success\\fP"]
        for feature in command.features:
            label = feature if isinstance(feature, str) else feature.get("name", "")
            self.lines += [".br", f"Feature: {escape(str(label))}"]
        if command.since:
            self.lines += [".br", f"Since: {escape(command.since)}"]

    def _members(self, members: Iterable[Any]) -> None:
        for member in members:
            details = [type_name(member.type)]
            if member.optional:
                details.append("optional")
            if member.since:
                details.append(f"since {member.since}")
            self.lines += [".TP", f"\\fB{escape(member.name)}\\fP ({escape(', '.join(details))})"]
            self.lines.extend(_text_lines(member.doc) or ["\\&"])

    # -- types -----------------------------------------------------------------

    def _types_used(self) -> List[str]:
        """Named types reachable from the commands, in schema order."""
        used: Dict[str, None] = {}
        for name in self.schema.command_names():
            command = self.schema.command(name)
            for member in self.schema.command_members(name):
                used.update(dict.fromkeys(self.schema.referenced_types(member.type)))
            if isinstance(command.data, str):
                used.update(dict.fromkeys(self.schema.referenced_types(command.data)))
            if command.returns is not None:
                used.update(dict.fromkeys(self.schema.referenced_types(command.returns)))
        return [name for name in self.schema.type_names() if name in used]

    def _type(self, name: str) -> None:
        definition = self.schema.type_definition(name)
        kind = self.schema.kind(name)
        self.lines += [f".SS {escape(name)} ({kind})"]
        self.lines.extend(_text_lines(definition.get("doc", "")))
        if kind == "struct":
            self._members(self.schema.members(name))
        elif kind == "enum":
            self._enum(definition)
        elif kind == "union":
            self._union(name, definition)
        elif kind == "alternate":
            self._alternate(definition)
        if definition.get("since"):
            self.lines += [".PP", f"Since: {escape(definition['since'])}"]

    def _enum(self, definition: Dict[str, Any]) -> None:
        for value in definition["data"]:
            if isinstance(value, str):
                value = {"name": value}
            if not condition_holds(value.get("if"), self.defines):
                continue
            label = value["name"] + (f" (since {value['since']})" if value.get("since") else "")
            self.lines += [".TP", f"\\fB{escape(label)}\\fP"]
            self.lines.extend(_text_lines(value.get("doc", "")) or ["\\&"])

    def _union(self, name: str, definition: Dict[str, Any]) -> None:
        self._members(self.schema.union_base(name))
        self.lines += [".PP", f"Further members by \\fB{escape(definition['discriminator'])}\\fP:"]
        for value, variant in self.schema.union_variants(name).items():
            target = escape(variant) if variant else "no further members"
            self.lines += [".TP", f"\\fB{escape(value)}\\fP", target]

    def _alternate(self, definition: Dict[str, Any]) -> None:
        self.lines += [".PP", "One of:"]
        for branch, spec in definition["data"].items():
            if isinstance(spec, dict):
                if not condition_holds(spec.get("if"), self.defines):
                    continue
                doc, spec = spec.get("doc", ""), spec["type"]
            else:
                doc = ""
            self.lines += [".TP", f"\\fB{escape(type_name(spec))}\\fP ({escape(branch)})"]
            self.lines.extend(_text_lines(doc) or ["\\&"])


def render(schema_path: Optional[str] = None) -> str:
    with open(schema_path or SCHEMA_PATH, "rb") as stream:
        document = json.load(stream)
    return ReferencePage(document).render()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m qga.docs",
                                     description="Write qga-ref(7) from qapi-schema.json.")
    parser.add_argument("schema", nargs="?", help="schema file (default: the package's)")
    parser.add_argument("-o", "--output", help="output file (default: standard output)")
    args = parser.parse_args(argv)
    page = render(args.schema)
    if args.output:
        from qga.state import atomic_write

        atomic_write(args.output, page.encode("utf-8"), 0o644)
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
