"""A script's run configuration: built once from its flags, frozen, in sections, with the flags the
user typed recorded (torchtitan's typed job config; EDM2's kwargs written once).

    config = parse(get_args_parser(), argv)   # the flags as given: config.lr, config.given
    run = config.replace(lr=..., fid_stats=...)  # derived or adopted values: a new config
    run.as_dict()                              # a plain dict: a checkpoint's `args`
    values, notes = merge(implied, typed, fixed=..., where=...)  # what weights imply, with the typed flags

Sections come from the parser's argument groups (a flag added to a group lands in its section
without more code); values a script derives that are no flag (e.g. `init_origin`) go to the section
"derived". Every value reads flat, `config.<flag>`, as from an argparse.Namespace. The values keep
the types argparse gave them; a list stays a list (the checkpoints' `args` hold lists).
"""

import argparse
import copy
import types

from util.errors import BadValue

DERIVED = "derived"
_UNGROUPED = ("positional arguments", "options", "optional arguments")


def sections_of(parser: argparse.ArgumentParser) -> dict[str, tuple[str, ...]]:
    """{section: flag names (dests)} from the parser's argument groups, in their order; flags outside
    a titled group are in "options"."""
    out = {}
    for group in parser._action_groups:  # argparse keeps its groups here (stable since Python 3.2)
        name = "options" if group.title in _UNGROUPED else group.title
        dests = [a.dest for a in group._group_actions if a.dest != "help" and a.dest != argparse.SUPPRESS]
        out[name] = tuple(dict.fromkeys([*out.get(name, ()), *dests]))
    return {k: v for k, v in out.items() if v}


def typed_flags(parser: argparse.ArgumentParser, argv=None) -> frozenset[str]:
    """The flags (dests) that `argv` names, whatever their values: a default typed out is typed."""
    bare = copy.deepcopy(parser)
    for action in bare._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    bare._defaults = {}
    return frozenset(vars(bare.parse_args(argv)))


class RunConfig:
    """Frozen settings of a run. `config.<name>` reads a value; `replace` returns a new config;
    `given`: the flags typed on the command line; `section(name)`: one section's values."""

    __slots__ = ("_values", "_sections", "given")

    def __init__(self, values: dict, sections: dict[str, tuple[str, ...]], given=frozenset()):
        known = {n for names in sections.values() for n in names}
        extra = tuple(n for n in values if n not in known and n not in sections.get(DERIVED, ()))
        sections = {**sections, DERIVED: (*sections.get(DERIVED, ()), *extra)} if extra else dict(sections)
        object.__setattr__(self, "_values", types.MappingProxyType(dict(values)))
        object.__setattr__(self, "_sections", types.MappingProxyType({k: tuple(v) for k, v in sections.items()}))
        object.__setattr__(self, "given", frozenset(given))

    def __getattr__(self, name: str):
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"the run config has no {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError(f"the run config is frozen: config.replace({name}=...) returns a new one")

    def __delattr__(self, name):
        raise AttributeError("the run config is frozen")

    def __contains__(self, name: str) -> bool:
        return name in self._values

    def __eq__(self, other) -> bool:
        return isinstance(other, RunConfig) and dict(self._values) == dict(other._values) and self.given == other.given

    __hash__ = None

    def __repr__(self) -> str:
        return "RunConfig(" + ", ".join(f"{k}={v!r}" for k, v in self._values.items()) + ")"

    def __reduce__(self):  # picklable (a process group broadcasts plain objects)
        return RunConfig, (dict(self._values), dict(self._sections), self.given)

    def replace(self, **changes) -> "RunConfig":
        """A new config with `changes`; names that are no flag join the section "derived"."""
        return RunConfig({**self._values, **changes}, dict(self._sections), self.given)

    def section(self, name: str) -> types.MappingProxyType:
        """{name: value} of one section (a parser group's title, or "derived")."""
        return types.MappingProxyType({n: self._values[n] for n in self._sections[name] if n in self._values})

    @property
    def sections(self) -> tuple[str, ...]:
        return tuple(self._sections)

    def as_dict(self) -> dict:
        """A plain dict of every value (what a checkpoint stores as `args`)."""
        return dict(self._values)


def parse(parser: argparse.ArgumentParser, argv=None, defaults: dict | None = None) -> RunConfig:
    """The flags of `argv` (None: sys.argv[1:]) as a RunConfig, with what was typed in `given`.
    defaults: other defaults for this parse (values typed on the command line still win)."""
    if defaults:
        parser = copy.deepcopy(parser)
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    return RunConfig(vars(args), sections_of(parser), typed_flags(parser, argv))


def _single(value):
    return value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else value


def merge(implied: dict, typed: dict, *, fixed=(), where: str, agrees=None) -> tuple[dict, list[str]]:
    """The values some weights imply ({flag: value}, e.g. read off a checkpoint or config.json) with
    the flags the user typed (`typed`: {flag: value}; None and flags not in `implied` are skipped, a
    one-element list counts as its element). A typed flag of `fixed` (what the weights were trained
    as) that disagrees raises BadValue; any other overrides the implied value, and a note says so.
    agrees(flag, typed value, implied values) -> bool decides agreement (default: equality).
    Returns (values, notes for the log)."""
    agrees = agrees or (lambda flag, value, values: value == values[flag])
    values, notes = dict(implied), []
    for flag, value in typed.items():
        value = _single(value)
        if flag not in values or value is None or agrees(flag, value, values):
            continue
        if flag in fixed:
            raise BadValue(
                f"--{flag} {value} disagrees with {where} ({values[flag]}), the settings these weights "
                "were trained with: drop the flag"
            )
        notes.append(f"--{flag} {value} overrides {values[flag]} of {where}")
        values[flag] = value
    return values, notes
