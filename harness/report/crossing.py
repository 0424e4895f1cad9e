"""The crossed question of a study with [axes]: each technique's effect at every axis level, and whether it differs
between levels. Effects are arm minus baseline arm at the same level (its variant against the reference, `awd`,
and against `no_dropout`, as without axes); an interaction contrast is one variant's effect against no_dropout at
one level minus its effect at another level of one axis, the other axes held fixed, paired over the confirmation
seeds. `cross` computes them all as one Holm family: with axes, the report's headline reads its effects from it.
"""

import itertools
from dataclasses import dataclass, replace

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


def arms_at(study: StudyConfig, variant: str, level: dict) -> list[str]:
    """The arms of `variant` that agree with this level on every axis both set: one arm for a full level; for a level
    without some axis (an arm that axis cannot act on) the variant's arm at each of that axis's values."""
    return [name for name, arm in study.variants.items()
            if arm.variant == variant and all(level.get(key, value) == value for key, value in arm.axes)]


def effects_against(study: StudyConfig, baseline: str) -> list[Pair]:
    """Each arm of every other variant against the baseline variant's arm at its level, in arm order. An arm an axis
    cannot act on is compared at each of that axis's levels where the baseline has an arm of its own (one effect per
    level: the baseline's arm is what differs); the pair's level holds the axis values of both arms."""
    pairs = []
    for name, arm in study.variants.items():
        if arm.variant == baseline:
            continue
        mine = dict(arm.axes)
        for other in arms_at(study, baseline, mine):
            level = {**mine, **dict(study.variants[other].axes)}
            level = tuple((key, level[key]) for key in study.axes if key in level)  # in [axes] order
            pairs.append(Pair(name, other, arm.variant, baseline, level))
    return pairs


def has_variant(study: StudyConfig, variant: str) -> bool:
    """Whether any arm of the study runs this variant."""
    return any(arm.variant == variant for arm in study.variants.values())


def crossed_pairs(study: StudyConfig, reference: str = REFERENCE) -> list[Pair]:
    """Every effect the crossed report measures, as without axes but per level: each arm against the reference
    variant's arm at its level (when the study has that variant), then each arm against no_dropout's (each
    technique's own effect). The reference's own effect against no_dropout is measured once: where no_dropout's arm
    is already compared with that reference arm, it is read turned (CrossedResult.effect)."""
    pairs = effects_against(study, reference) if has_variant(study, reference) else []
    if has_variant(study, NO_DROPOUT) and reference != NO_DROPOUT:
        measured = {(p.arm, p.baseline) for p in pairs}
        pairs += [p for p in effects_against(study, NO_DROPOUT) if (p.baseline, p.arm) not in measured]
    return pairs


def interactions(study: StudyConfig, reference: str = REFERENCE) -> list[Interaction]:
    """For each variant's effect against no_dropout (against the reference when the study has no no_dropout), the
    reference's own included, and each axis: every two levels of that axis with the other axes equal. Effects
    against the second baseline are not crossed again: each contrast added to the Holm family costs power."""
    baseline = NO_DROPOUT if has_variant(study, NO_DROPOUT) else reference
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


def axis_label(study: StudyConfig, key: str) -> str:
    """An axis as arm names spell it: "cell", or the full key where two axes share a short name."""
    short = key.split(".", 1)[1]
    return short if sum(k.split(".", 1)[1] == short for k in study.axes) == 1 else key


def level_text(study: StudyConfig, level) -> str:
    """((key, value), ...) as "cell=gru, train_tokens=2000"; "every level" for an arm no axis acts on."""
    return ", ".join(f"{axis_label(study, k)}={v}" for k, v in level) or "every level"


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


@dataclass(frozen=True)
class Effect:
    """One arm against its baseline's arm at the same level: the pair and its comparison (arm minus baseline)."""

    pair: Pair
    comparison: stats.Comparison


@dataclass(frozen=True)
class CrossedResult:
    """Every crossed comparison of a study with axes, adjusted together (p_holm over effects and interactions)."""

    study: StudyConfig
    reference: str  # the variant whose arm at each level the others are compared with first ("awd")
    effects: list  # Effect, in crossed_pairs order
    interactions: list  # Interaction, comparison filled (effect at the first level minus at the second)

    @property
    def family(self) -> list:
        """Every comparison of the one Holm family, effects first."""
        return [e.comparison for e in self.effects] + [i.comparison for i in self.interactions]

    def effect(self, pair: Pair) -> tuple:
        """(diff, ci, comparison) of pair.arm minus pair.baseline: the reference's effect against no_dropout is
        measured once, as no_dropout against the reference, so it is read here with its sign turned."""
        for e in self.effects:
            if (e.pair.arm, e.pair.baseline) == (pair.arm, pair.baseline):
                return e.comparison.diff, e.comparison.ci, e.comparison
        for e in self.effects:
            if (e.pair.arm, e.pair.baseline) == (pair.baseline, pair.arm):
                c = e.comparison
                ci = c.ci and stats.Interval(-c.ci.high, -c.ci.low, c.ci.method, c.ci.confidence)
                return (None if c.diff is None else -c.diff), ci, c
        raise KeyError(f"{pair.arm} against {pair.baseline} is not among the crossed effects")


def cross(study: StudyConfig, test_ppl: dict, reference: str = REFERENCE) -> CrossedResult | None:
    """The crossed comparisons from arm -> {seed: test perplexity}, Holm-adjusted as one family (stats.adjust);
    None when the study has no axes."""
    if not study.axes:
        return None
    pairs, contrasts = crossed_pairs(study, reference), interactions(study, reference)
    compared = [stats.compare(test_ppl.get(p.arm, {}), test_ppl.get(p.baseline, {}), names=(p.arm, p.baseline))
                for p in pairs] + [compare_interaction(i, test_ppl) for i in contrasts]
    adjusted = stats.adjust(compared)
    return CrossedResult(study, reference, [Effect(p, c) for p, c in zip(pairs, adjusted)],
                         [replace(i, comparison=c) for i, c in zip(contrasts, adjusted[len(pairs):])])
