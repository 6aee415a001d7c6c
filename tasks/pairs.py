"""Stage `pairs@<round>`: preference pairs from the judged responses, mixed with the round's human pairs.

`onpolicy.pairs.strategy`:
- `best_worst`: per prompt, the highest-scored response is chosen and the lowest rejected;
- `margin`: every two responses whose scores differ by at least `min_gap` (widest first, at most
  `max_pairs_per_prompt` per prompt);
- `one_attribute`: pairs that differ in exactly one of the judge's attributes (one per attribute and prompt).
Pairs closer than `min_gap` (ties), degenerate ones (an empty response, or chosen and rejected the same
text), and, when set, pairs whose chosen scores below `min_chosen_score`, whose lengths differ by more than
`max_length_difference` tokens or whose texts are more alike than `max_similarity` are dropped, and each
prompt left without a pair is counted by the reason. With `replay_fraction` set, pairs the round's starting
policy was trained on are added (replay of earlier rounds). The result goes through the same validation as every
pairs file (file:line reasons, `data.on_bad_lines`, dedup) and its report carries the pair
statistics: count, mean score gap, and the lengths of chosen and rejected responses, since
length drift is the known failure of iterative DPO.
"""

from __future__ import annotations

import difflib
import random
import statistics
from pathlib import Path
from typing import Any

from tasks.lib.chat import as_response, boundary_report, last_content
from tasks.lib.errors import DataError
from tasks.lib.files import atomic_path, load_records, write_json, write_records
from tasks.lib.policies import TRAINED_PAIRS_FILE, load_base_tokenizer
from tasks.lib.records import enforce_bad_line_policy, file_report, read_records, token_length_report
from tasks.lib.schema import PairParams, Params
from tasks.lib.stage import stage_main
from tasks.lib.stats import length_summary

DROP_REASONS = ("tie", "degenerate", "weak_chosen", "length", "similar", "attribute")
"""Why a prompt gave no pair: responses within `min_gap`; empty or identical responses; no chosen scoring
`min_chosen_score`; none within `max_length_difference`; all above `max_similarity`; none differing in exactly
one attribute."""


def similarity(first: str, second: str) -> float:
    return difflib.SequenceMatcher(None, first, second, autojunk=False).ratio()


def single_attribute(chosen: dict, rejected: dict) -> str | None:
    """The one attribute the chosen response has and the rejected lacks, all others equal; else None."""
    differing = [name for name in chosen if chosen[name] != rejected[name]]
    return differing[0] if len(differing) == 1 and chosen[differing[0]] else None


def prompt_pairs(row: dict, settings: PairParams) -> tuple[list[tuple[int, int]], str | None]:
    """(chosen, rejected) response indices of one prompt, widest score gap first, or none and why (DROP_REASONS)."""
    texts, scores = row["responses"], row["scores"]
    usable = [i for i, text in enumerate(texts) if text]
    if len(usable) < 2:
        return [], "degenerate"
    # Widest gap first; ties broken by index, so best_worst is the first best against the first worst.
    candidates = sorted(
        ((c, r) for c in usable for r in usable if c != r and scores[c] - scores[r] >= settings.min_gap),
        key=lambda pair: (scores[pair[1]] - scores[pair[0]], pair),
    )
    checks = [
        ("tie", None),
        ("degenerate", lambda c, r: texts[c] != texts[r]),
        ("weak_chosen", None if settings.min_chosen_score is None else
            lambda c, r: scores[c] >= settings.min_chosen_score),
        ("length", None if settings.max_length_difference is None else
            lambda c, r: abs(row["tokens"][c] - row["tokens"][r]) <= settings.max_length_difference),
        ("similar", None if settings.max_similarity is None else
            lambda c, r: similarity(texts[c], texts[r]) <= settings.max_similarity),
        ("attribute", None if settings.strategy != "one_attribute" else
            lambda c, r: single_attribute(row["attributes"][c], row["attributes"][r]) is not None),
    ]  # fmt: skip
    for reason, keep in checks:
        candidates = candidates if keep is None else [(c, r) for c, r in candidates if keep(c, r)]
        if not candidates:
            return [], reason
    if settings.strategy == "best_worst":
        return candidates[:1], None
    if settings.strategy == "one_attribute":
        per_attribute: dict[str, tuple[int, int]] = {}
        for c, r in candidates:
            per_attribute.setdefault(single_attribute(row["attributes"][c], row["attributes"][r]), (c, r))
        candidates = sorted(per_attribute.values(), key=candidates.index)
    return candidates[: settings.max_pairs_per_prompt], None


def judged_pairs(scored: list[dict], settings: PairParams) -> tuple[list[dict], dict[str, Any]]:
    pairs, gaps, dropped = [], [], dict.fromkeys(DROP_REASONS, 0)
    for row in scored:
        indices, reason = prompt_pairs(row, settings)
        if reason:
            dropped[reason] += 1
        for chosen, rejected in indices:
            gaps.append(row["scores"][chosen] - row["scores"][rejected])
            pairs.append(
                {
                    "prompt": row["prompt"],
                    "chosen": as_response(row["prompt"], row["responses"][chosen]),
                    "rejected": as_response(row["prompt"], row["responses"][rejected]),
                }
            )
    stats = {
        "prompts": len(scored),
        "ties_dropped": dropped["tie"],
        "degenerate_dropped": dropped["degenerate"],
        "weak_chosen_dropped": dropped["weak_chosen"],
        "length_mismatch_dropped": dropped["length"],
        "near_identical_dropped": dropped["similar"],
        "no_single_attribute_dropped": dropped["attribute"],
        "mean_score_gap": round(statistics.fmean(gaps), 4) if gaps else None,
    }
    return pairs, stats


def length_stats(pairs: list[dict], tokenizer) -> dict[str, float | None]:
    """Mean length (characters) and mean and p95 length (tokens) of chosen and of rejected responses."""
    stats: dict[str, float | None] = {}
    for side in ("chosen", "rejected"):
        texts = [last_content(pair[side]) for pair in pairs]
        tokens = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
        stats[f"{side}_chars_mean"] = round(statistics.fmean(map(len, texts)), 2) if texts else None
        summary = length_summary(tokens)
        stats[f"{side}_tokens_mean"], stats[f"{side}_tokens_p95"] = summary["mean"], summary["p95"]
    return stats


def replayed_pairs(previous_policy: Path, fraction: float, seed: int) -> list[dict]:
    """`fraction` of the pairs the starting policy was trained on, drawn at random (none for the SFT snapshot)."""
    trained = previous_policy / TRAINED_PAIRS_FILE
    if not fraction or not trained.is_file():
        return []
    earlier = load_records(trained)
    return random.Random(seed).sample(earlier, round(fraction * len(earlier)))


def kept_per_source(kept_lines: list[int], written: dict[str, int], names: dict[str, str]) -> dict[str, int]:
    """How many pairs of each source survived validation (sources are written one after another, in order).

    Dropping bad lines may thin a source, never empty it: a whole source refused means the sources disagree
    (a format, a field) and training on what is left would silently be another experiment.
    """
    kept, first_line = {}, 1
    for source, count in written.items():
        kept[source] = sum(first_line <= line < first_line + count for line in kept_lines)
        if count and not kept[source]:
            raise DataError(
                f"all {count} {source} pairs ({names[source]}) were refused beside the other sources' pairs"
            )
        first_line += count
    return kept


def build_pairs(
    params: Params, scored: Path, incoming: Path, previous_policy: Path, base: Path, out: Path, report: Path
) -> dict:
    """Pair the round's judged responses, add its human pairs and any replayed ones, validate them all and report.

    Args:
        params: the pipeline's params
        scored: judged responses (from judge@<round>)
        incoming: the round's validated human pairs
        previous_policy: the policy the round starts from (the pairs it was trained on are replayed)
        base: base folder (its tokenizer measures lengths)
        out: the round's training pairs (JSON lines)
        report: the stage's report (counts, ties, score gap, lengths)
    """
    onpolicy, onpolicy_stats = judged_pairs(load_records(scored), params.onpolicy.pairs)
    human = load_records(incoming)
    replayed = replayed_pairs(previous_policy, params.onpolicy.pairs.replay_fraction, params.onpolicy.generate.seed)
    written = {"on-policy": len(onpolicy), "human": len(human), "replayed": len(replayed)}
    names = {
        "on-policy": "judged responses",
        "human": str(incoming),
        "replayed": str(previous_policy / TRAINED_PAIRS_FILE),
    }
    with atomic_path(out) as scratch:
        write_records(scratch, onpolicy + human + replayed)
        result = read_records(scratch, "pairs")
        result.path = out  # bad lines are reported against the file the stage writes, not its scratch copy
        if not result.rows:
            raise DataError(
                f"no preference pairs: {onpolicy_stats['ties_dropped']} of {onpolicy_stats['prompts']} "
                f"prompts' responses tied within onpolicy.pairs.min_gap={params.onpolicy.pairs.min_gap}, "
                f"{onpolicy_stats['degenerate_dropped']} were degenerate, "
                f"{onpolicy_stats['weak_chosen_dropped']} had no response scoring onpolicy.pairs.min_chosen_score, "
                f"{onpolicy_stats['length_mismatch_dropped']} length-mismatched, "
                f"{onpolicy_stats['near_identical_dropped']} near-identical, "
                f"{onpolicy_stats['no_single_attribute_dropped']} had no single-attribute pair, "
                f"and {incoming} has no human pairs"
            )
        enforce_bad_line_policy(result, params.data.on_bad_lines, params.data.max_bad_fraction)
        kept = kept_per_source(result.row_lines, written, names)
        write_records(scratch, result.rows)
    tokenizer = load_base_tokenizer(base, params.model)
    summary = {
        "pairs": len(result.rows),
        "onpolicy_pairs": kept["on-policy"],
        "human_pairs": kept["human"],
        "replayed_pairs": kept["replayed"],
        **onpolicy_stats,
        **length_stats(result.rows, tokenizer),
        **file_report(result),
        **token_length_report(result.rows, tokenizer, params.dpo.sequence.max_length),
        "template": boundary_report(result.rows, tokenizer),
    }
    write_json(report, summary)
    print(
        f"pairs: {summary['pairs']} ({summary['onpolicy_pairs']} on-policy, {summary['human_pairs']} human, "
        f"{summary['replayed_pairs']} replayed); "
        f"dropped {summary['ties_dropped']} ties, {summary['degenerate_dropped']} degenerate; mean gap "
        f"{summary['mean_score_gap']}; chosen/rejected {summary['chosen_chars_mean']}/"
        f"{summary['rejected_chars_mean']} chars"
    )
    for dropped in summary["dropped_lines"]:
        print(f"  dropped {dropped}")
    return summary


if __name__ == "__main__":
    stage_main(build_pairs)
