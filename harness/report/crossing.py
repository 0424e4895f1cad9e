"""The crossed question of a study with [axes]: each technique's effect at every axis level, and whether it differs
between levels. Effects are arm minus baseline arm at the same level (its variant against `awd` and against
`no_dropout`, as without axes); an interaction contrast is one variant's effect against no_dropout at one level
minus its effect at another level of one axis, the other axes held fixed, paired over the confirmation seeds.
"""

import itertools
from dataclasses import dataclass

from harness import stats
from harness.study.spec import StudyConfig

REFERENCE = "awd"
NO_DROPOUT = "no_dropout"


@dataclass(frozen=True)
class Pair:
    """One effect: an arm against its baseline's arm at the same axis level."""

    arm: str
    baseline: str  # the baseline's arm (e.g. "no_dropout@cell=gru")
    variant: str  # the arm's variant ("weight_only")
    baseline_variant: str  # "no_dropout" or "awd"
    level: tuple  # ((axis key, value), ...) of the arm


@dataclass(frozen=True)
class Interaction:
    """One variant's effect against a baseline at two levels of one axis (the other axes equal): does it differ?"""

    variant: str
    baseline_variant: str
    axis: str  # the axis key, e.g. "model.cell"
    levels: tuple  # (value at the first level, value at the second)
    at: tuple  # ((key, value), ...) of the other axes, held fixed
    first: Pair
    second: Pair
    comparison: stats.Comparison | None = None  # effect at first level minus effect at second, once compared


def level_of(study: StudyConfig, arm: str) -> dict:
    """The arm's axis values, key -> value."""
    return dict(study.variants[arm].axes)


def arm_at(study: StudyConfig, variant: str, level: dict) -> str | None:
    """The arm of `variant` at this level: the one whose axis values agree with it on every axis it has (a variant an
    axis cannot act on has one arm for all that axis's values); None when the study has no such variant."""
    for name, arm in study.variants.items():
        if arm.variant == variant and all(level.get(key) == value for key, value in arm.axes):
            return name
    return None


def effects_against(study: StudyConfig, baseline: str) -> list[Pair]:
    """Each arm of every other variant against the baseline variant's arm at its level, in arm order."""
    pairs = []
    for name, arm in study.variants.items():
        other = arm_at(study, baseline, dict(arm.axes)) if arm.variant != baseline else None
        if other is not None:
            pairs.append(Pair(name, other, arm.variant, baseline, arm.axes))
    return pairs


def _has(study: StudyConfig, variant: str) -> bool:
    return any(arm.variant == variant for arm in study.variants.values())


def crossed_pairs(study: StudyConfig) -> list[Pair]:
    """Every effect the crossed report measures, as without axes but per level: each arm against awd's arm at its
    level (when the study has awd), then each other arm against no_dropout's (each technique's own effect)."""
    pairs = effects_against(study, REFERENCE) if _has(study, REFERENCE) else []
    if _has(study, NO_DROPOUT):
        pairs += [p for p in effects_against(study, NO_DROPOUT) if p.variant != REFERENCE or not pairs]
    return pairs


def interactions(study: StudyConfig) -> list[Interaction]:
    """For each variant's effect against no_dropout (against awd when the study has no no_dropout), awd's own
    included, and each axis: every two levels of that axis with the other axes equal. Effects against the second
    baseline are not crossed again: each contrast added to the Holm family costs power."""
    baseline = NO_DROPOUT if _has(study, NO_DROPOUT) else REFERENCE
    effects = effects_against(study, baseline)
    out = []
    for axis in study.axes:
        for variant in dict.fromkeys(p.variant for p in effects):
            by_rest = {}
            for pair in (p for p in effects if p.variant == variant and axis in dict(p.level)):
                rest = tuple((k, v) for k, v in pair.level if k != axis)
                by_rest.setdefault(rest, []).append(pair)
            for rest, group in by_rest.items():
                for first, second in itertools.combinations(group, 2):
                    out.append(Interaction(variant, baseline, axis, (dict(first.level)[axis],
                                                                     dict(second.level)[axis]), rest, first, second))
    return out


def per_seed_effect(values: dict, baseline: dict) -> dict:
    """seed -> arm minus baseline, over the seeds both ran (confirmation seeds are paired across arms)."""
    return {seed: values[seed] - baseline[seed] for seed in sorted(set(values) & set(baseline))}


def compare_interaction(interaction: Interaction, test_ppl: dict) -> stats.Comparison:
    """The interaction contrast, unadjusted: the first level's per-seed effect against the second's (paired where
    both have the seed)."""
    first = per_seed_effect(test_ppl.get(interaction.first.arm, {}), test_ppl.get(interaction.first.baseline, {}))
    second = per_seed_effect(test_ppl.get(interaction.second.arm, {}), test_ppl.get(interaction.second.baseline, {}))
    axis = interaction.axis.split(".", 1)[1]
    return stats.compare(first, second, names=(f"{interaction.variant} effect at {axis}={interaction.levels[0]}",
                                               f"at {axis}={interaction.levels[1]}"))
