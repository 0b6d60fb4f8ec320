"""PIO-FVLM schedules and constants: light (no torch), so the command-line tools can check
``--budget`` / ``--pio-schedule`` / ``--pio-encoder-tokens`` before any heavy import.

The names are re-exported by ``pio_fvlm`` (the readable reference), where they are documented
with the method; see ``pio_fvlm.md`` for the schedules' tables.
"""

from __future__ import annotations

import dataclasses
import re

from fsr.errors import FsrError

#: Number of supervised prompt positions of the proxy loss (``K_pos``, spec section 4).
K_POS = 4
#: Cosine threshold of the feature-space NMS (spec section 6).
TAU = 0.8
#: Floor of the feature norm in the NMS normalisation (``F.normalize``'s eps upstream).
NORM_EPS = 1e-12


class PioError(FsrError, ValueError):
    """A PIO-FVLM schedule, model or input that cannot be used; the message says why."""


# ----------------------------------------------------------------------------- schedules


@dataclasses.dataclass(frozen=True)
class PioStage:
    """One pruning point: after decoder layer ``layer - 1`` keep ``keep`` visual tokens.

    ``layer`` is the spec's 1-based number ``r``; it is also the 0-based index of the proxy
    layer and of the first layer that sees the pruned sequence.
    """

    layer: int
    keep: int


@dataclasses.dataclass(frozen=True)
class PioSchedule:
    """Pruning stages in layer order, and the optional encoder-side stage ("w/ VE").

    ``encoder_tokens``: visual tokens left by the encoder-side stage (spec section 7), or
    None when the LLM receives every visual token.
    """

    stages: tuple[PioStage, ...]
    encoder_tokens: int | None = None

    def __post_init__(self):
        if not self.stages:
            raise PioError("a PIO-FVLM schedule needs at least one stage, e.g. '1:92,10:54,15:22'")
        for i, st in enumerate(self.stages):
            for what, value in (("layer", st.layer), ("token count", st.keep)):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise PioError(
                        f"stage {i + 1}: the {what} must be an integer >= 1, got {value!r} "
                        "(layers are 1-based: '1:92' prunes after the first decoder layer)")
        for i, (a, b) in enumerate(zip(self.stages, self.stages[1:]), start=2):
            if b.layer <= a.layer:
                raise PioError(f"stage {i}: layer {b.layer} does not come after layer {a.layer}; "
                               "list the stages in increasing layer order, each layer once")
            if b.keep >= a.keep:
                raise PioError(f"stage {i}: keeps {b.keep} visual tokens but only {a.keep} enter it; "
                               "each stage must keep fewer tokens than the one before")
        e = self.encoder_tokens
        if e is not None and (isinstance(e, bool) or not isinstance(e, int) or e < 1):
            raise PioError(f"the encoder-side token count must be an integer >= 1, got {e!r}")
        if e is not None and self.stages[0].keep >= e:
            raise PioError(f"stage 1 keeps {self.stages[0].keep} visual tokens but the encoder stage "
                           f"leaves only {e}; keep fewer in the LLM than the encoder passes in")

    @property
    def layers(self) -> tuple[int, ...]:
        """The 1-based layer numbers ``r`` (= 0-based decoder split indices)."""
        return tuple(st.layer for st in self.stages)

    def visual_tokens(self, num_visual: int) -> int:
        """Visual tokens that enter the LLM: ``encoder_tokens`` if set, else ``num_visual``."""
        return num_visual if self.encoder_tokens is None else self.encoder_tokens

    def validate(self, *, num_layers: int, num_visual: int) -> None:
        """Check the schedule against an LLM of ``num_layers`` layers and ``num_visual`` image tokens."""
        if self.encoder_tokens is not None and self.encoder_tokens >= num_visual:
            raise PioError(f"the encoder-side stage keeps {self.encoder_tokens} of {num_visual} image "
                           "tokens: it must keep fewer (omit it to give the LLM every token)")
        entering = self.visual_tokens(num_visual)
        if self.stages[0].keep >= entering:
            raise PioError(f"stage 1 keeps {self.stages[0].keep} visual tokens but only {entering} "
                           "enter the LLM; keep fewer")
        last = self.stages[-1].layer
        if last > num_layers - 1:
            raise PioError(
                f"layer {last} is out of range for an LLM with {num_layers} layers: a stage at layer r "
                f"needs decoder layer r (0-based) as its proxy, so r must be at most {num_layers - 1}")

    def token_counts(self, num_visual: int) -> list[tuple[int, int]]:
        """``(n, keep)`` per stage: visual tokens entering it and kept by it."""
        counts, n = [], self.visual_tokens(num_visual)
        for st in self.stages:
            counts.append((n, st.keep))
            n = st.keep
        return counts

    def tokens_per_layer(self, *, num_layers: int, num_visual: int) -> list[int]:
        """Visual tokens each decoder layer (0-based) sees."""
        self.validate(num_layers=num_layers, num_visual=num_visual)
        seen, n, stages = [], self.visual_tokens(num_visual), {st.layer: st.keep for st in self.stages}
        for layer in range(num_layers):
            n = stages.get(layer, n)
            seen.append(n)
        return seen

    def average(self, *, num_layers: int, num_visual: int) -> float:
        """Mean visual tokens per decoder layer, as the spec computes its budgets.

        LLaVA-1.5 (32 layers, 576 tokens): (576 + 9*92 + 5*54 + 17*22) / 32 = 64 for
        ``1:92,10:54,15:22``; w/ VE: (16*96 + 16*32) / 32 = 64.
        """
        seen = self.tokens_per_layer(num_layers=num_layers, num_visual=num_visual)
        return sum(seen) / num_layers

    def __str__(self) -> str:
        return ",".join(f"{st.layer}:{st.keep}" for st in self.stages)


_ITEM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pio_schedule(text: str, *, encoder_tokens: int | None = None) -> PioSchedule:
    """``"1:92,10:54,15:22"`` (1-based layer ``:`` visual tokens kept) -> `PioSchedule`.

    Raises `PioError` naming the bad item and the expected form.
    """
    if not isinstance(text, str) or not text.strip():
        raise PioError("empty PIO-FVLM schedule; give 'LAYER:TOKENS' items separated by commas, "
                       "e.g. --pio-schedule '1:92,10:54,15:22'")
    stages = []
    for i, item in enumerate(text.split(","), start=1):
        match = _ITEM.match(item)
        if match is None:
            raise PioError(f"schedule item {i} {item.strip()!r} is not 'LAYER:TOKENS' with two non-negative "
                           "integers (e.g. '10:54': after decoder layer 10, 1-based, keep 54 visual tokens)")
        layer, keep = int(match.group(1)), int(match.group(2))
        if layer == 0:
            raise PioError(f"schedule item {i} {item.strip()!r}: layers are 1-based, so 0 would prune before "
                           "the LLM; that is the encoder-side stage (--pio-encoder-tokens)")
        if keep == 0:
            raise PioError(f"schedule item {i} {item.strip()!r}: a stage must keep at least 1 visual token")
        stages.append(PioStage(layer, keep))
    return PioSchedule(tuple(stages), encoder_tokens=encoder_tokens)


#: LLaVA-1.5 schedules by average visual-token budget (32 layers, 576 tokens). 64 and 128 are
#: the spec's (the upstream code comment and eval scripts); 192 is **ours**: stage by stage
#: ``2 * s128 - s64`` (344 = 2*218 - 92, 202 = 2*128 - 54, 86 = 2*54 - 22), the linear
#: continuation of the two published schedules; the average is linear in the counts, so it is
#: exactly 2*128 - 64 = 192: (576 + 9*344 + 5*202 + 17*86) / 32 = 192.
LLAVA15_SCHEDULES: dict[int, PioSchedule] = {
    64: parse_pio_schedule("1:92,10:54,15:22"),
    128: parse_pio_schedule("1:218,10:128,15:54"),
    192: parse_pio_schedule("1:344,10:202,15:86"),
}

#: The upstream README's default LLaVA-1.5 configuration, w/ VE: 96 tokens from the encoder
#: stage, 32 kept after decoder layer 16 (1-based); average 64.
LLAVA15_VE_SCHEDULE_64 = parse_pio_schedule("16:32", encoder_tokens=96)


def llava15_schedule(budget: int) -> PioSchedule:
    """The LLaVA-1.5 schedule of average budget ``budget`` (64, 128 or 192)."""
    if budget not in LLAVA15_SCHEDULES:
        raise PioError(f"no PIO-FVLM schedule for average budget {budget!r}; choose one of "
                       f"{', '.join(map(str, LLAVA15_SCHEDULES))}, or give the stages with "
                       "--pio-schedule 'LAYER:TOKENS,...'")
    return LLAVA15_SCHEDULES[budget]


#: Upstream's attention layers for the encoder-side stage, 0-based among CLIP ViT-L/14-336's 24
#: layers: windowed local picks from layer 5, global picks from layer 22 (LLaVA-1.5's feature
#: layer, so the global map is FSR's saliency). Another tower depth needs its own choice.
VE_LOCAL_LAYER, VE_GLOBAL_LAYER = 5, 22
#: Windows per side of the patch grid for the local picks (4 x 4 = 16 windows of 6 x 6 on 24 x 24).
VE_WINDOWS = 4


def encoder_stage_counts(num_visual: int, keep: int, windows: int = VE_WINDOWS) -> tuple[int, int, int]:
    """``(grid side, local picks per window, global picks)`` of the encoder-side stage.

    ``nl = int(keep * 0.5)`` local tokens are asked for, ``nl // windows**2`` per window, and
    ``keep - nl`` global ones: ``windows**2 * (nl // windows**2) + keep - nl`` tokens are kept
    (``keep`` itself when ``windows**2`` divides ``nl``, e.g. 96 -> 16 * 3 + 48).
    """
    side = int(round(num_visual ** 0.5))
    if side * side != num_visual or side % windows:
        raise PioError(f"the encoder-side stage needs a square patch grid divisible into {windows} x {windows} "
                       f"windows; {num_visual} tokens are not one")
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep < num_visual:
        raise PioError(f"the encoder-side stage keeps an integer in [1, {num_visual - 1}] tokens, got {keep!r}")
    local = int(keep * 0.5)
    return side, local // (windows * windows), keep - local
