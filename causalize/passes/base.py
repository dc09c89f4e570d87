"""What a pass is: a named, versioned rewrite of an nn.Module tree with typed options.

A pass finds its sites (module paths) from the plan's targets, rewrites them in place and returns
records of what it changed. The records feed the conversion report and the manifest.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch.nn as nn

    from causalize.plan import Plan

NAME_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


@dataclass(frozen=True)
class Site:
    """One place a pass would rewrite: module path, its class, and a short human note."""

    path: str
    kind: str
    note: str = ""


@dataclass(frozen=True)
class Record:
    """What a pass changed at one site (before -> after), for the report and the manifest."""

    pass_name: str
    path: str
    before: str
    after: str
    note: str = ""

    def to_json(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def option(default: Any, help: str) -> Any:
    """A pass option with its help text (shown by `causalize passes`), as PEFT's config fields
    carry theirs: `transfer: str = option("extrapolative", "how the kernel moves into the past")`."""
    return dataclasses.field(default=default, metadata={"help": help})


def option_help(fld: dataclasses.Field) -> str:
    return str(fld.metadata.get("help", ""))


@dataclass
class PassContext:
    """What a pass may consult besides the model: the plan (targets, layout) and the pass options."""

    plan: Plan
    options: Any
    extra: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class of every pass. Subclasses set `name`, `version`, `Options` and implement two methods.

    `find_sites` must not modify the model (it backs `causalize inspect` and `--dry-run`);
    `apply` rewrites the sites and returns one Record per site.
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1
    summary: ClassVar[str] = ""

    @dataclass(frozen=True)
    class Options:
        pass

    def find_sites(self, model: nn.Module, ctx: PassContext) -> list[Site]:
        raise NotImplementedError

    def apply(self, model: nn.Module, ctx: PassContext) -> list[Record]:
        raise NotImplementedError

    @classmethod
    def option_fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls.Options))
