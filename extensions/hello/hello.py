"""hello: the example qga extension.

Commands (declared with their JSON Schemas in manifest.json):

* ``greet {"who": NAME}`` answers ``{"greeting": "hello NAME", "count": N}``
  and emits the event ``greeted``; the count survives restarts and upgrades
  (it is kept in the extension's state directory);
* ``echo {...}`` answers its arguments (a round trip, for benchmarks);
* ``emit {"count": N}`` emits N ``tick`` events and answers how many the SDK
  could queue.

The settings have one member, ``greeting`` (default "hello").
The bundle ships a copy of the SDK (``qga_ext_sdk.py``) beside this file.
"""

import json
import os
import sys

try:
    import qga_ext_sdk as sdk          # the copy in the bundle
except ImportError:                     # run from a checkout
    from qga.ext import sdk

extension = sdk.Extension()
counter_path = os.path.join(extension.state_dir or ".", "count.json")


def load_count():
    try:
        with open(counter_path) as stream:
            return json.load(stream)["count"]
    except (OSError, ValueError, KeyError):
        return 0


def save_count(count):
    temporary = counter_path + ".new"
    with open(temporary, "w") as stream:
        json.dump({"count": count}, stream)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, counter_path)


@extension.command("greet")
def greet(arguments):
    who = arguments.get("who", "world")
    count = load_count() + 1
    save_count(count)
    extension.emit("greeted", {"who": who, "count": count})
    return {"greeting": f"{extension.settings.get('greeting', 'hello')} {who}", "count": count}


@extension.command("echo")
def echo(arguments):
    return arguments


@extension.command("emit")
def emit(arguments):
    return sum(extension.emit("tick", {"n": n}) for n in range(arguments["count"]))


if __name__ == "__main__":
    sys.exit(extension.run())
