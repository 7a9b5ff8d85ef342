"""Strata HSM policy written in Python (world `strata:plugin/dm-policy@0.1.0`).

Built into a WebAssembly component by componentize-py (see scripts/build-py-plugin.sh).
The `wit_world` package imported below does not live in this directory: componentize-py
generates it from the project's `wit/` directory at build time.

Policy (same idea as the Rust `hsm-age-policy`):

* config: `key=value` lines; blank lines and lines starting with `#` are skipped.
  Keys: `tier` (default `archive`), `min_size` (bytes, default 0), `min_age_secs`
  (since last modification, default 0), `min_idle_secs` (since last access, default 0),
  `release_after_migrate` (`true`/`false`, default `false`). An unknown key, a line
  without `=`, or a bad value makes `init` return an error string.
* `scan`: a file without a migration record (DM attribute `stratloc`) that is at least
  `min_size` bytes, unmodified for `min_age_secs` and unaccessed for `min_idle_secs`
  -> `migrate(tier)`; a file with a record -> `release` if `release_after_migrate`,
  else `ignore`. Anything unclear (a DMAPI error, a non-regular file) -> `ignore`.
* `on-event`: read/write/truncate on a file with a migration record -> request a
  recall, then `continue`; `abort(EIO)` if the recall (or reading the record) fails.
  A `user` event whose payload is `b"probe"` runs the sandbox probe. Anything else ->
  `continue`.
* `on-notify`: logged.

Sandbox probe (in `init` and on the `probe` user event): tries to open a host file, list
the host's root directory, connect a TCP socket to 127.0.0.1:9 and read the environment,
and stores each outcome in the kv store (`probe.open`, `probe.listdir`, `probe.socket`,
`probe.env`) as UTF-8 text starting with `denied:` or `allowed:`.

No exception may leave a hook: an exception escaping an export traps the instance.
Every hook catches everything and logs it.
"""

import errno
import os
import re
from typing import List

import wit_world
from componentize_py_types import Err
from wit_world.imports import clock, dm_host, kv, log
from wit_world.imports.dm_types import (
    Action_Ignore,
    Action_Migrate,
    Action_Release,
    DmError,
    Event,
    EventData_Data,
    EventData_User,
    EventType,
    FileStat,
    Response,
    Response_Abort,
    Response_Continue,
    ScanAction,
)

# DM attribute holding the migration record: exactly DM_ATTR_NAME_SIZE (8) bytes.
ATTR_LOCATION = b"stratloc"
assert len(ATTR_LOCATION) == 8

EPERM = 1
EIO = 5

U64_MAX = (1 << 64) - 1

S_IFMT = 0o170000
S_IFREG = 0o100000

DATA_EVENTS = (EventType.READ, EventType.WRITE, EventType.TRUNCATE)

PROBE_PAYLOAD = b"probe"
PROBE_KEYS = ("probe.open", "probe.listdir", "probe.socket", "probe.env")


class Config:
    """The policy's settings; the defaults apply to keys the config text leaves out."""

    def __init__(self) -> None:
        self.tier = "archive"
        self.min_size = 0
        self.min_age_secs = 0
        self.min_idle_secs = 0
        self.release_after_migrate = False

    def describe(self) -> str:
        return (
            f"tier={self.tier} min_size={self.min_size} min_age_secs={self.min_age_secs} "
            f"min_idle_secs={self.min_idle_secs} "
            f"release_after_migrate={'true' if self.release_after_migrate else 'false'}"
        )


_UINT = re.compile(r"[0-9]+")


def _parse_u64(key: str, value: str) -> int:
    # Stricter than int(): no sign, no underscores, no non-ASCII digits.
    if not _UINT.fullmatch(value):
        raise ValueError(f"{key}: expected a non-negative integer, got {value!r}")
    number = int(value)
    if number > U64_MAX:
        raise ValueError(f"{key}: {value} does not fit in 64 bits")
    return number


def parse_config(text: str) -> Config:
    """Parses the slot's config text; raises ValueError with a readable message."""
    config = Config()
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"line {lineno}: expected key=value, got {line!r}")
        key = key.strip()
        value = value.strip()
        try:
            if key == "tier":
                if not value:
                    raise ValueError("tier: must not be empty")
                config.tier = value
            elif key == "min_size":
                config.min_size = _parse_u64(key, value)
            elif key == "min_age_secs":
                config.min_age_secs = _parse_u64(key, value)
            elif key == "min_idle_secs":
                config.min_idle_secs = _parse_u64(key, value)
            elif key == "release_after_migrate":
                if value == "true":
                    config.release_after_migrate = True
                elif value == "false":
                    config.release_after_migrate = False
                else:
                    raise ValueError(f"{key}: expected true or false, got {value!r}")
            else:
                raise ValueError(f"unknown key {key!r}")
        except ValueError as error:
            raise ValueError(f"line {lineno}: {error}") from None
    return config


# Module-level state: the instance lives as long as the plugin slot's version does, and
# `init` is called before any other export.
_config = Config()


def _log(level: log.Level, message: str) -> None:
    try:
        log.log(level, message)
    except BaseException:  # the log itself failing must not trap the hook either
        pass


def _describe(error: BaseException) -> str:
    if isinstance(error, Err):
        value = error.value
        return f"Err({value.name if hasattr(value, 'name') else value!r})"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _handle_hex(handle: bytes) -> str:
    return bytes(handle).hex()


# --- migration records --------------------------------------------------------------------


def has_migration_record(handle: bytes) -> bool:
    """True when the file has a `stratloc` DM attribute, False on `enoent`.

    Any other DMAPI error propagates as `Err(DmError)`: the caller cannot tell.
    """
    try:
        dm_host.get_dmattr(handle, ATTR_LOCATION)
    except Err as error:
        if error.value == DmError.ENOENT:
            return False
        raise
    return True


# --- scan -----------------------------------------------------------------------------------


def _elapsed(now_secs: int, then_secs: int) -> int:
    return max(0, now_secs - then_secs)


def decide(config: Config, stat: FileStat, now_secs: int):
    """The action for one file of a scan batch."""
    if has_migration_record(stat.handle):
        return Action_Release() if config.release_after_migrate else Action_Ignore()
    file_type = stat.mode & S_IFMT
    if file_type not in (0, S_IFREG):
        # Directories, links, devices... (a mode without type bits is taken as a file).
        return Action_Ignore()
    if stat.size < config.min_size:
        return Action_Ignore()
    if _elapsed(now_secs, stat.mtime.seconds) < config.min_age_secs:
        return Action_Ignore()
    if _elapsed(now_secs, stat.atime.seconds) < config.min_idle_secs:
        return Action_Ignore()
    return Action_Migrate(config.tier)


def _scan(batch: List[FileStat]) -> List[ScanAction]:
    config = _config
    now_secs = clock.now().seconds
    actions = []
    for stat in batch:
        try:
            action = decide(config, stat, now_secs)
        except BaseException as error:
            _log(
                log.Level.WARN,
                f"hsm-py-policy: scan: {stat.path or _handle_hex(stat.handle)}: "
                f"{_describe(error)}; ignoring the file",
            )
            action = Action_Ignore()
        actions.append(ScanAction(handle=stat.handle, action=action))
    return actions


# --- events ---------------------------------------------------------------------------------


def _data_event(kind: EventType, data) -> Response:
    try:
        migrated = has_migration_record(data.handle)
    except Err as error:
        _log(
            log.Level.ERROR,
            f"hsm-py-policy: {kind.name.lower()} on {_handle_hex(data.handle)}: "
            f"cannot read the migration record: {_describe(error)}; aborting with EIO",
        )
        return Response_Abort(EIO)
    if not migrated:
        return Response_Continue()
    if kind == EventType.TRUNCATE:
        # Whatever survives the truncation must be resident: recall the whole file.
        offset, length = 0, 0
    else:
        offset, length = data.offset, data.length
    try:
        dm_host.request_recall(data.handle, offset, length)
    except Err as error:
        _log(
            log.Level.ERROR,
            f"hsm-py-policy: recall of {_handle_hex(data.handle)} [{offset}+{length}] "
            f"failed: {_describe(error)}; aborting with EIO",
        )
        return Response_Abort(EIO)
    _log(
        log.Level.DEBUG,
        f"hsm-py-policy: recalled {_handle_hex(data.handle)} [{offset}+{length}] "
        f"for {kind.name.lower()}",
    )
    return Response_Continue()


# --- sandbox probe --------------------------------------------------------------------------

# errnos by which the sandbox (not the network) refuses a socket.
_SOCKET_DENIALS = {
    getattr(errno, name)
    for name in ("EACCES", "EPERM", "ENOTSUP", "EOPNOTSUPP", "ENOSYS", "EAFNOSUPPORT",
                 "EPROTONOSUPPORT", "ENOTCAPABLE")
    if hasattr(errno, name)
}


def _probe_open() -> str:
    try:
        with open("/etc/hostname", "rb") as file:
            content = file.read(256)
    except BaseException as error:
        return f"denied: {_describe(error)}"
    return f"allowed: read {len(content)} bytes: {content[:64]!r}"


def _probe_listdir() -> str:
    try:
        names = os.listdir("/")
    except BaseException as error:
        return f"denied: {_describe(error)}"
    shown = ", ".join(sorted(names)[:16])
    return f"allowed: {len(names)} entries: {shown}"


def _probe_socket() -> str:
    # Reaching the port at all (connected, refused, timed out) means the sandbox let the
    # packet out; only a refusal by the sandbox itself counts as denied.
    try:
        import socket
    except BaseException as error:
        return f"denied: {_describe(error)}"
    sock = None
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.connect(("127.0.0.1", 9))
    except BaseException as error:
        if isinstance(error, OSError) and error.errno is not None \
                and error.errno not in _SOCKET_DENIALS \
                and not isinstance(error, PermissionError):
            return f"allowed: reached 127.0.0.1:9: {_describe(error)}"
        return f"denied: {_describe(error)}"
    finally:
        if sock is not None:
            try:
                sock.close()
            except BaseException:
                pass
    return "allowed: connected to 127.0.0.1:9"


def _probe_env() -> str:
    try:
        names = sorted(os.environ.keys())
    except BaseException as error:
        return f"denied: {_describe(error)}"
    if not names:
        return "denied: empty environment"
    # Names only: values may be secrets and the kv store is readable by the operator.
    return f"allowed: {len(names)} variables: {', '.join(names[:32])}"


def run_probe() -> bool:
    """Runs the four probes, records them in kv; True when all four were denied."""
    outcomes = {
        "probe.open": _probe_open(),
        "probe.listdir": _probe_listdir(),
        "probe.socket": _probe_socket(),
        "probe.env": _probe_env(),
    }
    all_denied = True
    for key in PROBE_KEYS:
        outcome = outcomes[key]
        if not outcome.startswith("denied:"):
            all_denied = False
        try:
            kv.set(key, outcome.encode("utf-8"))
        except BaseException as error:
            _log(log.Level.WARN, f"hsm-py-policy: kv set {key}: {_describe(error)}")
        _log(log.Level.INFO, f"hsm-py-policy: {key} = {outcome}")
    return all_denied


# --- the world ------------------------------------------------------------------------------


class WitWorld(wit_world.WitWorld):
    def init(self, config: str) -> None:
        global _config
        try:
            run_probe()
        except BaseException as error:
            _log(log.Level.ERROR, f"hsm-py-policy: probe failed: {_describe(error)}")
        try:
            parsed = parse_config(config)
        except ValueError as error:
            _log(log.Level.ERROR, f"hsm-py-policy: bad config: {error}")
            raise Err(f"hsm-py-policy: {error}")
        except BaseException as error:
            raise Err(f"hsm-py-policy: cannot read the config: {_describe(error)}")
        _config = parsed
        _log(log.Level.INFO, f"hsm-py-policy: configured: {parsed.describe()}")

    def on_event(self, event: Event) -> Response:
        data = event.data
        try:
            if isinstance(data, EventData_User):
                if bytes(data.value) == PROBE_PAYLOAD:
                    return Response_Continue() if run_probe() else Response_Abort(EPERM)
                return Response_Continue()
            if event.kind in DATA_EVENTS and isinstance(data, EventData_Data):
                return _data_event(event.kind, data.value)
            return Response_Continue()
        except BaseException as error:
            _log(log.Level.ERROR, f"hsm-py-policy: on-event {event.kind.name.lower()}: "
                                  f"{_describe(error)}")
            if isinstance(data, EventData_User):
                return Response_Abort(EPERM)
            if isinstance(data, EventData_Data):
                return Response_Abort(EIO)
            return Response_Continue()

    def on_notify(self, event: Event) -> None:
        try:
            data = event.data
            detail = type(data).__name__.rpartition("_")[2].lower()
            if isinstance(data, EventData_Data):
                detail += (f" handle={_handle_hex(data.value.handle)} "
                           f"offset={data.value.offset} length={data.value.length}")
            elif isinstance(data, EventData_User):
                detail += f" payload={len(data.value)} bytes"
            _log(
                log.Level.INFO,
                f"hsm-py-policy: notify {event.kind.name.lower()} seq={event.sequence} "
                f"session={event.session} {detail}",
            )
        except BaseException as error:
            _log(log.Level.ERROR, f"hsm-py-policy: on-notify: {_describe(error)}")

    def scan(self, batch: List[FileStat]) -> List[ScanAction]:
        try:
            return _scan(batch)
        except BaseException as error:
            _log(log.Level.ERROR, f"hsm-py-policy: scan failed: {_describe(error)}; "
                                  f"ignoring the batch")
            try:
                return [ScanAction(handle=stat.handle, action=Action_Ignore())
                        for stat in batch]
            except BaseException:
                return []
