"""``qga-client``: talk to a guest agent (qemu-ga or qga) from the host's shell.

::

    qga-client [-s SOCKET] [--timeout S] [--json] ping
    qga-client info
    qga-client call '{"execute": "guest-get-time"}'      (or: call guest-get-time ['<args>'])
    qga-client cat GUEST_PATH
    qga-client exec [--no-capture] [--env K=V]... [--input FILE] PROG [ARGS...]
    qga-client get GUEST_PATH LOCAL_PATH
    qga-client put LOCAL_PATH GUEST_PATH
    qga-client push [--statement F] [--signature F] [--no-wait] BUNDLE
    qga-client ext list | status NAME | start NAME | stop NAME | remove NAME
    qga-client ext call NAME COMMAND ['<json arguments>'] [--call-timeout S]
    qga-client ext events NAME [--follow] [--max N] [--cursor C]

The socket defaults to ``$QGA_SOCKET``.  Output is meant for people unless
``--json`` asks for JSON.  Exit status: 0 on success, 1 when the agent
answers with an error or cannot be reached, 2 for usage errors; ``exec``
exits with the program's exit code (128 + N when killed by signal N);
``push`` exits 1 when the new version was rolled back or failed.

``push`` uploads a bundle (its ``.statement`` and ``.sig`` beside it by
default), installs it and waits until the new version is ready or the agent
rolled back; on a terminal it draws a progress bar on stderr.  ``ext events
--follow`` prints events as they come (one JSON object a line) until
interrupted.  These commands need qga in the guest (qemu-ga has no
extensions).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from typing import Any, Dict, Optional, Sequence

from qga.errors import AgentError, ClientError
from qga.host.client import Client

PROG = "qga-client"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
EXIT_SIGPIPE = 128 + 13


class UsageError(Exception):
    """A bad command line detected after argparse (exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Talk to a QEMU guest agent (qemu-ga or qga) over its Unix socket.")
    parser.add_argument("-s", "--socket", default=os.environ.get("QGA_SOCKET"),
                        help="the agent's socket (default: $QGA_SOCKET)")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="S",
                        help="seconds to wait for each reply (default 30; 0 waits forever)")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    commands.add_parser("ping", help="check that the agent answers")
    commands.add_parser("info", help="agent version and commands")

    call = commands.add_parser("call", help="run any command and print its return value")
    call.add_argument("request", help="a request object as JSON, or a command name")
    call.add_argument("arguments", nargs="?", help="the command's arguments as a JSON object")

    cat = commands.add_parser("cat", help="print a guest file")
    cat.add_argument("path", metavar="GUEST_PATH")

    run = commands.add_parser("exec", help="run a program in the guest, wait for its exit code",
                              description="Options go before PROG; everything after it is "
                                          "passed to the program.")
    run.add_argument("--no-capture", action="store_true", help="do not collect its output")
    run.add_argument("--env", action="append", default=None, metavar="K=V",
                     help="environment variable (repeatable; replaces the whole environment)")
    run.add_argument("--input", metavar="FILE", help="feed FILE to its stdin ('-': our stdin)")
    run.add_argument("program", metavar="PROG")
    run.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS")

    get = commands.add_parser("get", help="copy a guest file to the host")
    get.add_argument("guest_path", metavar="GUEST_PATH")
    get.add_argument("local_path", metavar="LOCAL_PATH")

    put = commands.add_parser("put", help="copy a host file into the guest")
    put.add_argument("local_path", metavar="LOCAL_PATH")
    put.add_argument("guest_path", metavar="GUEST_PATH")

    push = commands.add_parser("push", help="upload and install an extension bundle")
    push.add_argument("bundle", metavar="BUNDLE")
    push.add_argument("--statement", help="the signed statement (default BUNDLE.statement)")
    push.add_argument("--signature", help="the signature (default BUNDLE.sig)")
    push.add_argument("--no-wait", action="store_true",
                      help="return once installed, without waiting for the new version")

    ext = commands.add_parser("ext", help="installed extensions")
    ext_commands = ext.add_subparsers(dest="ext_command", metavar="SUBCOMMAND")
    ext_commands.required = True
    ext_commands.add_parser("list", help="the installed extensions")
    for name, text in (("status", "an extension's status and last install"),
                       ("start", "start an extension (and with the agent from now on)"),
                       ("stop", "stop an extension (and no longer with the agent)"),
                       ("remove", "stop an extension and delete it and its data")):
        ext_commands.add_parser(name, help=text).add_argument("name", metavar="NAME")
    ext_call = ext_commands.add_parser("call", help="send a request to an extension")
    ext_call.add_argument("name", metavar="NAME")
    ext_call.add_argument("ext_command_name", metavar="COMMAND")
    ext_call.add_argument("arguments", nargs="?", help="the request's arguments, a JSON object")
    ext_call.add_argument("--call-timeout", type=float, metavar="S",
                          help="how long the agent waits for the extension")
    ext_events = ext_commands.add_parser("events", help="read an extension's events")
    ext_events.add_argument("name", metavar="NAME")
    ext_events.add_argument("--follow", "-f", action="store_true",
                            help="keep printing events as they come")
    ext_events.add_argument("--max", type=int, default=None, metavar="N",
                            help="at most N events per read (1..1000)")
    ext_events.add_argument("--cursor", help="start after this cursor")
    return parser


# -- commands -----------------------------------------------------------------


def cmd_ping(client: Client, options: argparse.Namespace) -> int:
    client.ping()
    print_result(options, {}, "ok")
    return EXIT_OK


def cmd_info(client: Client, options: argparse.Namespace) -> int:
    info = client.info()
    if options.json:
        print_json(info)
        return EXIT_OK
    print(f"version {info.get('version')}")
    for entry in sorted(info.get("supported_commands", []), key=lambda item: item["name"]):
        notes = []
        if not entry.get("enabled", True):
            notes.append("disabled")
        if not entry.get("success-response", True):
            notes.append("no reply on success")
        suffix = f"  ({', '.join(notes)})" if notes else ""
        print(f"  {entry['name']}{suffix}")
    return EXIT_OK


def cmd_call(client: Client, options: argparse.Namespace) -> int:
    execute, arguments = parse_call(options.request, options.arguments)
    result = client.call(execute, arguments)
    if options.json:
        print_json(result)
    elif result is not None:
        print(json.dumps(result, indent=2, sort_keys=False))
    return EXIT_OK


def parse_call(request: str, arguments: Optional[str]):
    """(execute, arguments) from ``call``'s operands."""
    text = request.strip()
    if text.startswith("{"):
        if arguments is not None:
            raise UsageError("give the arguments inside the request object")
        value = load_json(text, "request")
        if not isinstance(value, dict) or not isinstance(value.get("execute"), str):
            raise UsageError('the request must be an object with an "execute" string')
        unknown = set(value) - {"execute", "arguments"}
        if unknown:
            raise UsageError(f"unexpected member(s) in the request: {', '.join(sorted(unknown))}")
        return value["execute"], value.get("arguments")
    parsed_arguments = None
    if arguments is not None:
        parsed_arguments = load_json(arguments, "arguments")
        if not isinstance(parsed_arguments, dict):
            raise UsageError("the arguments must be a JSON object")
    return text, parsed_arguments


def load_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as error:
        raise UsageError(f"the {what} is not valid JSON: {error}") from None


def cmd_cat(client: Client, options: argparse.Namespace) -> int:
    out = sys.stdout.buffer
    for chunk in client.iter_file(options.path):
        out.write(chunk)
    out.flush()
    return EXIT_OK


def cmd_exec(client: Client, options: argparse.Namespace) -> int:
    env = None
    if options.env is not None:
        for item in options.env:
            if "=" not in item:
                raise UsageError(f"--env wants K=V, not {item!r}")
        env = list(options.env)
    input_data = read_input(options.input) if options.input is not None else None
    result = client.exec(options.program, options.args, env=env, input_data=input_data,
                         capture=not options.no_capture)
    if options.json:
        status: Dict[str, Any] = {"pid": result.pid, "exitcode": result.exitcode,
                                  "signal": result.signal}
        if result.stdout or result.out_truncated:
            status["out-data"] = base64.b64encode(result.stdout).decode("ascii")
            status["out-truncated"] = result.out_truncated
        if result.stderr or result.err_truncated:
            status["err-data"] = base64.b64encode(result.stderr).decode("ascii")
            status["err-truncated"] = result.err_truncated
        print_json(status)
    else:
        write_binary(sys.stdout, result.stdout)
        write_binary(sys.stderr, result.stderr)
        for name, truncated in (("stdout", result.out_truncated), ("stderr", result.err_truncated)):
            if truncated:
                warn(f"the program's {name} was truncated by the agent")
    if result.signal is not None:
        return 128 + result.signal
    return result.exitcode or 0


def read_input(name: str) -> bytes:
    if name == "-":
        return sys.stdin.buffer.read()
    with open(name, "rb") as source:
        return source.read()


def cmd_get(client: Client, options: argparse.Namespace) -> int:
    with open(options.local_path, "wb") as dest:
        count = client.read_file(options.guest_path, dest)
    print_result(options, {"bytes": count}, f"{count} bytes copied to {options.local_path}")
    return EXIT_OK


def cmd_put(client: Client, options: argparse.Namespace) -> int:
    with open(options.local_path, "rb") as source:
        count = client.write_file(options.guest_path, source)
    print_result(options, {"bytes": count}, f"{count} bytes copied to {options.guest_path}")
    return EXIT_OK


def cmd_push(client: Client, options: argparse.Namespace) -> int:
    statement = read_file_option(options.statement)
    signature = read_file_option(options.signature)
    bar = ProgressBar(os.path.basename(options.bundle)) if sys.stderr.isatty() else None
    try:
        record = client.push(options.bundle, statement, signature, wait=not options.no_wait,
                             progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.finish()
    state = record.get("state")
    human = f"{record.get('name')} {record.get('version')}: {state}"
    if record.get("error"):
        human += f" ({record['error']})"
    print_result(options, record, human)
    return EXIT_OK if state in ("done", "installing") else EXIT_FAILURE


def read_file_option(path: Optional[str]) -> Optional[bytes]:
    if path is None:
        return None
    with open(path, "rb") as source:
        return source.read(1024 * 1024)


class ProgressBar:
    """``name [#####.....]  42%  3.1/7.4 MiB`` redrawn on one stderr line."""

    WIDTH = 30

    def __init__(self, name: str):
        self.name = name
        self.drawn = False

    def update(self, sent: int, total: int) -> None:
        done = int(self.WIDTH * sent / total) if total else self.WIDTH
        percent = int(100 * sent / total) if total else 100
        sys.stderr.write(f"\r{self.name} [{'#' * done}{'.' * (self.WIDTH - done)}]"
                         f" {percent:3d}%  {sent / 1048576:.1f}/{total / 1048576:.1f} MiB")
        sys.stderr.flush()
        self.drawn = True

    def finish(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()


def cmd_ext(client: Client, options: argparse.Namespace) -> int:
    command = options.ext_command
    if command == "list":
        extensions = client.ext_list()
        if options.json:
            print_json(extensions)
            return EXIT_OK
        for item in extensions:
            enabled = "" if item.get("enabled", True) else "  (stopped by the host)"
            print(f"{item['name']} {item['version']} {item['state']} {item.get('mode', '')}"
                  f"{enabled}")
        return EXIT_OK
    if command == "status":
        status = client.ext_status(options.name)
        if options.json:
            print_json(status)
        else:
            for key, value in status.items():
                shown = json.dumps(value) if isinstance(value, (dict, list, bool)) else value
                print(f"{key}: {shown}")
        return EXIT_OK
    if command in ("start", "stop", "remove"):
        getattr(client, f"ext_{command}")(options.name)
        print_result(options, {}, f"{options.name}: {command} done")
        return EXIT_OK
    if command == "call":
        arguments = None
        if options.arguments is not None:
            arguments = load_json(options.arguments, "arguments")
            if not isinstance(arguments, dict):
                raise UsageError("the arguments must be a JSON object")
        result = client.ext_call(options.name, options.ext_command_name, arguments,
                                 options.call_timeout)
        if options.json:
            print_json(result)
        else:
            print(json.dumps(result, indent=2))
        return EXIT_OK
    return ext_events(client, options)


def ext_events(client: Client, options: argparse.Namespace) -> int:
    if options.max is not None and not 1 <= options.max <= 1000:
        raise UsageError("--max must be between 1 and 1000")
    if not options.follow:
        batch = client.ext_events(options.name, options.cursor, options.max)
        if options.json:
            print_json(batch)
        else:
            for event in batch["events"]:
                print(json.dumps(event))
            warn(f"cursor {batch['cursor']}, {batch['dropped']} dropped so far")
        return EXIT_OK
    try:
        for event in client.follow_events(options.name, options.cursor):
            print(json.dumps(event), flush=True)
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK


COMMANDS = {
    "ping": cmd_ping,
    "info": cmd_info,
    "call": cmd_call,
    "cat": cmd_cat,
    "exec": cmd_exec,
    "get": cmd_get,
    "put": cmd_put,
    "push": cmd_push,
    "ext": cmd_ext,
}


# -- output -------------------------------------------------------------------


def print_json(value: Any) -> None:
    print(json.dumps(value))


def print_result(options: argparse.Namespace, value: Any, human: str) -> None:
    if options.json:
        print_json(value)
    else:
        print(human)


def write_binary(stream: Any, data: bytes) -> None:
    if data:
        stream.flush()
        stream.buffer.write(data)
        stream.buffer.flush()


def warn(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


# -- entry point --------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    options = parser.parse_args(argv)
    if not options.socket:
        parser.error("no socket: use -s SOCKET or set QGA_SOCKET")
    if options.timeout < 0:
        parser.error("--timeout must not be negative")
    timeout = options.timeout or None
    client = Client(options.socket, timeout=timeout)
    try:
        return COMMANDS[options.command](client, options)
    except UsageError as error:
        parser.error(str(error))
    except AgentError as error:
        warn(f"{error.command}: {error.error_class}: {error.desc}")
    except ClientError as error:
        warn(str(error))
    except BrokenPipeError:
        # The reader went away (qga-client cat FILE | head): stop quietly, like cat.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_SIGPIPE
    except OSError as error:
        warn(str(error))
    finally:
        client.close()
    return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
