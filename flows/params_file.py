"""What the flows change in params.yaml: appended rounds, and dotted keys written back in place.

Stages never write params.yaml; only a flow run does, for `next_round` and for one-run overrides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from tasks.lib.files import atomic_path
from tasks.lib.params import ParamsError
from tasks.lib.schema import SFT_POLICY, Params


def extended_rounds(params: Params, count: int) -> dict[str, dict[str, str]]:
    """The rounds mapping cut or extended to `count` rounds, as raw params.

    Appended rounds are named `r<K>` and start from the round before; their pairs are generated
    on-policy (see `onpolicy`).
    """
    if count < 1:
        raise ParamsError(f"rounds: need at least 1 round (got {count})")
    # Kept rounds exactly as written (no defaults filled in): a key DVC tracks must not change under a kept round.
    rounds = {name: spec.model_dump(exclude_unset=True) for name, spec in list(params.dpo.rounds.items())[:count]}
    plan = params.orchestration.next_round
    while len(rounds) < count:
        previous = list(rounds)[-1]
        name = f"r{len(rounds) + 1}"
        if name in rounds:
            raise ParamsError(f"dpo.rounds: cannot append {name}: the name is taken (rename the rounds r1, r2, ...)")
        reference = SFT_POLICY if plan.reference == SFT_POLICY else previous
        rounds[name] = {"previous": previous, "reference": reference}
    return rounds


def write_params(path: str | Path, overrides: dict[str, Any]) -> None:
    """Set dotted keys in params.yaml in place, keeping its comments, order and flow style.

    A mapping value replaces the mapping it lands on key by key, so untouched entries keep their layout.
    """
    path = Path(path)
    yaml_rt = YAML()
    yaml_rt.preserve_quotes = True
    yaml_rt.representer.add_representer(
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    document = yaml_rt.load(path.read_text(encoding="utf-8"))
    for dotted, value in overrides.items():
        node = document
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, CommentedMap())
        if isinstance(value, dict) and isinstance(node.get(leaf), CommentedMap):
            _replace_mapping(node[leaf], value)
        else:
            node[leaf] = value
    with atomic_path(path) as scratch, scratch.open("w", encoding="utf-8") as handle:
        yaml_rt.dump(document, handle)


def _replace_mapping(target: CommentedMap, value: dict[str, Any]) -> None:
    flow = [child.fa.flow_style() for child in target.values() if isinstance(child, CommentedMap)]
    for key in [key for key in target if key not in value]:
        del target[key]
    for key, item in value.items():
        if isinstance(item, dict) and not (isinstance(target.get(key), dict) and target[key] == item):
            mapping = CommentedMap(item)
            if flow and flow[-1]:
                mapping.fa.set_flow_style()
            target[key] = mapping
        elif not isinstance(item, dict):
            target[key] = item
