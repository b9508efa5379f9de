"""Settings: checked when they are read, and split into what identifies an experiment and what
only says how to run it.

Every settings class of `delrec` is a dataclass. `check(cls, values, where)` checks each key
against the class's fields (an unknown key names the closest known one) and each value against
the field's type, before any work starts, so a typo in a config file fails in a second rather
than after an hour of teacher training. `parse_overrides` reads `key=value` and
`section.key=value` the same way for `delrec run` and for every `--set`: the value is YAML
(`5e-4`, `[rps]`, `null`, `true`).

Runtime settings (a field declared with `runtime()`) say how a step runs, not what it computes:
the device, a scoring batch size, how often a checkpoint is written. `identity(config)` leaves
them out, and resume checks and the pipeline's "done with the same settings" compare identities
only, so moving a run to another device or changing a batch size that does not change results
never reruns a step (peft's `runtime_config` is the same idea).

A run folder may be copied or moved (`runs/a` to `runs/b`, or to another machine). Settings that
name an output of the run's own stage 1 (its soft prompt, the LLM `w UDPSM` updated) record
where it was then; `in_run` names it by its place in the run instead (`RUN/distill/NAME/llm`),
identities compare those names, and `resolve_in_run` finds the output in the folder the run is
in now.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from pathlib import Path

import yaml

from delrec.core.layout import RunLayout


def runtime(default=dataclasses.MISSING, **kwargs):
    """A dataclass field that does not identify the experiment (see the module docstring)."""
    return dataclasses.field(default=default, metadata={"runtime": True}, **kwargs)


def runtime_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("runtime")}


def identity(config) -> dict:
    """The settings that identify `config`'s results, as JSON values (tuples become lists)."""
    skip = runtime_names(type(config))
    values = {k: v for k, v in dataclasses.asdict(config).items() if k not in skip}
    return json.loads(json.dumps(values))


# what a run's stage-1 folder hands to later steps by path: RUN/distill/NAME/<one of these>
RUN_OUTPUTS = ("soft_prompt.safetensors", "llm")


def in_run(value):
    """`RUN/distill/NAME/OUTPUT` for a path to a stage-1 output of any run folder
    (`runs/x/distill/sasrec/soft_prompt.safetensors`); any other value unchanged."""
    if not isinstance(value, str):
        return value
    parts = Path(value).parts
    if len(parts) >= 3 and parts[-3] == RunLayout.STAGE1 and parts[-1] in RUN_OUTPUTS:
        return "RUN/" + "/".join(parts[-3:])
    return value


def resolve_in_run(value: str, run: str | Path) -> str:
    """`value` where it exists; else, for a stage-1 output recorded in another place (a copied or
    moved run folder), the same output in `run` when it exists there; else `value` unchanged, for
    the loader's own error."""
    named = in_run(value)
    if Path(value).exists() or named == value:
        return value
    here = Path(run) / named.removeprefix("RUN/")
    return str(here) if here.exists() else value


def same_identity(cls, recorded: dict, wanted: dict) -> bool:
    """Two settings dicts of `cls` (e.g. one read back from a run folder) identify the same
    results: runtime settings and those the wanted run does not read (`cls.unread`, when the class
    says) are ignored, and a key the recorded dict lacks counts as equal when
    the wanted value is the class default (a setting added later, with the old behaviour as its
    default, does not invalidate earlier results)."""
    skip = runtime_names(cls)
    defaults = json.loads(json.dumps(dataclasses.asdict(cls())))
    recorded, wanted = json.loads(json.dumps(recorded)), json.loads(json.dumps(wanted))
    # a stage-1 output by its place in the run, not by where the run folder was (see in_run)
    recorded, wanted = ({k: in_run(v) for k, v in d.items()} for d in (recorded, wanted))
    if hasattr(cls, "upgrade_recorded"):  # settings an earlier version recorded in another form
        recorded = cls.upgrade_recorded(recorded)
    recorded = {**{k: defaults[k] for k in wanted if k not in recorded and k in defaults}, **recorded}
    # a step's identity is what it reads: settings the wanted run does not read (cls.unread) are left out
    skip = skip | (cls.unread(wanted) if hasattr(cls, "unread") else set())
    drop = lambda d: {k: v for k, v in d.items() if k not in skip}  # noqa: E731
    return drop(recorded) == drop(wanted)


def closest(name: str, known) -> str:
    """` (did you mean 'x'?)` for the known name closest to `name`, or ''."""
    match = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def check(cls, values: dict, where: str) -> dict:
    """`values` with each key a field of `cls` and each value of the field's type; ints are
    accepted for floats, whole floats (`1e3`) for ints, lists for tuples; NaN and infinities
    (YAML's `.nan`, `.inf`, or `1e999`) for no float. Raises ValueError
    naming `where` (a file and section), the key, and the closest valid key."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping of settings, got {type(values).__name__} {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"{where}: unknown setting {key!r}{closest(str(key), known)}")
        out[key] = _coerce(hints[key], value, f"{where}: {key}")
    return out


class NotFinite(ValueError):
    """A float setting that is NaN or infinite (said as such, not as "expected a number or null")."""


def _coerce(hint, value, where: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where)
            except NotFinite:
                raise
            except ValueError:
                pass
        raise ValueError(f"{where}: expected {_name(hint)}, got {value!r}")
    if hint is typing.Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # YAML's .nan / .inf, or 1e999: no setting means either
                raise NotFinite(f"{where}: expected a finite number, got {value!r}")
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, Path):
            return str(value)
    elif origin is tuple or hint is tuple:
        if isinstance(value, (list, tuple)):
            args = typing.get_args(hint)
            item = args[0] if args and (len(args) == 1 or args[1] is Ellipsis) else typing.Any
            return tuple(_coerce(item, v, where) for v in value)
    elif origin is list or hint is list:
        if isinstance(value, (list, tuple)):
            args = typing.get_args(hint)
            return [_coerce(args[0], v, where) for v in value] if args else list(value)
    elif origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
    else:
        return value  # a type this checker does not know: the class's own checks decide
    raise ValueError(f"{where}: expected {_name(hint)}, got {value!r}")


def _name(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_name(h) for h in typing.get_args(hint))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null",
             list: "a list", dict: "a mapping", tuple: "a list"}
    return names.get(hint, names.get(typing.get_origin(hint), str(hint)))


def parse_value(raw: str):
    """A `key=value` value as YAML, with YAML 1.1's `1e-4` (no dot) read as the number it is."""

    try:
        return numbers(yaml.safe_load(raw))
    except yaml.YAMLError:
        return raw


def parse_overrides(items: list[str] | None, where: str = "override") -> dict:
    """`key=value` / `section.key=value` items as a nested dict (values parsed by parse_value)."""
    values: dict = {}
    for item in items or []:
        apply_override(values, item, where)
    return values


def apply_override(values: dict, item: str, where: str = "override") -> None:
    if "=" not in item:
        raise ValueError(f"{where} {item!r}: expected key=value or section.key=value")
    key, raw = item.split("=", 1)
    parts = [p.strip() for p in key.split(".")]
    if not all(parts):
        raise ValueError(f"{where} {item!r}: empty key")
    target = values
    for p in parts[:-1]:
        target = target.setdefault(p, {})
        if not isinstance(target, dict):
            raise ValueError(f"{where} {item!r}: {p} is not a section")
    target[parts[-1]] = parse_value(raw)


def load_yaml(path: str | Path) -> dict:
    """A YAML mapping from `path`; a syntax error names the file, line and column."""

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and start is not None:
            problem += f" ({context} at line {start.line + 1})"
        raise ValueError(f"{path}: not valid YAML{at}: {problem}") from None
    values = numbers(values or {})
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config is a mapping of settings, got {type(values).__name__}")
    return values


def numbers(value):
    """YAML 1.1 reads `1e-4` (no dot) as a string; read such strings as the numbers they are."""
    if isinstance(value, dict):
        return {k: numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [numbers(v) for v in value]
    if isinstance(value, str):
        try:
            return float(value) if any(ch.isdigit() for ch in value) and value.strip().lower() not in ("nan", "inf") else value
        except ValueError:
            return value
    return value
