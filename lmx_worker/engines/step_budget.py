"""How many prompt tokens a step may carry while other sequences decode.

Stall-free batching (Sarathi-Serve; vLLM's chunked prefill): every step
decodes one token for each running sequence and reads at most a budget of
new prompt tokens, so a long prompt arriving makes the running streams
slower for a while instead of freezing them. The budget comes from a
latency target (`max_inter_token_ms`) and this worker's own measured cost:
step times are fitted, by least squares over a bounded window of recent
steps, against what each step carried (a fixed part, decoded tokens, prompt
tokens, and query x key pairs of attention, which is what makes a chunk
deep in a long context cost more). The fit follows the model, the host, its
load and the context length; nothing in it is specific to a backend.

With nothing decoding, nobody waits on the step, so the engine reads a
prompt in its largest efficient chunk, as without a budget.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Recent steps kept for the fit, per kind (decode-only / with prompt
# tokens): decode-only steps are the vast majority and must not push every
# prompt-reading step out of the window.
WINDOW = 64
# Steps whose measured time is compared with what the fit predicted; the
# budget aims the p98 of that ratio at the target, so noise on the host
# shrinks it instead of blowing the target. (The target is for the p99 of
# the streams' gaps; aiming the p90 measured p99 gaps 15 % over it, a 4k
# prompt beside 4 streams, quiet 2-core host.)
RATIO_WINDOW = 32
RATIO_QUANTILE = 0.98
# The share of the target a step aims at: the streams' gaps are seen at the
# client, past the gateway's own jitter, which the worker cannot measure
# (quiet 2-core host, 4k prompt beside 4 streams: client p99 gaps ran ~10 %
# above the worker's p98 steps).
TAIL_HEADROOM = 0.9
# A sample whose residual is this many times the median residual is an
# outlier (the host stalled the process) and is left out of the fit.
OUTLIER_FACTOR = 4.0


@dataclass(frozen=True)
class StepLoad:
    """What one step computes, as the cost model sees it."""

    decode_tokens: int  # tokens of sequences already generating
    prompt_tokens: int  # prompt tokens read in this step
    attention: float  # query x key pairs the step's attention covers

    def row(self) -> np.ndarray:
        return np.array([1.0, self.decode_tokens, self.prompt_tokens, self.attention])


class StepCostModel:
    """Step seconds ~ w . (1, decode tokens, prompt tokens, attention pairs),
    with w >= 0 (a step never gets cheaper by doing more)."""

    def __init__(self, window: int = WINDOW) -> None:
        self._decode_only: deque[tuple[np.ndarray, float]] = deque(maxlen=window)
        self._with_prompt: deque[tuple[np.ndarray, float]] = deque(maxlen=window)
        self._weights: np.ndarray | None = None
        self._stale = True

    def observe(self, load: StepLoad, seconds: float) -> None:
        window = self._with_prompt if load.prompt_tokens else self._decode_only
        window.append((load.row(), seconds))
        self._stale = True

    @property
    def knows_decoding(self) -> bool:
        """Steps that only decoded were seen: the fit can tell what the
        decode part of a step costs apart from the prompt part."""
        return bool(self._decode_only)

    @property
    def largest_prompt_chunk(self) -> int:
        """The most prompt tokens a step in the window carried beside decoding
        sequences: the fit is not trusted far beyond what it has seen. (Steps
        that only read prompts say little about a mixed step: a first chunk
        sized from them measured a 1 s gap beside 4 streams.)"""
        return max((int(row[2]) for row, _ in self._with_prompt if row[1] > 0), default=0)

    def predict(self, load: StepLoad) -> float | None:
        """Predicted seconds, or None before any step with prompt tokens
        was seen (the prompt's cost is unknown then)."""
        if self._stale:
            self._weights = self._fit()
            self._stale = False
        if self._weights is None:
            return None
        return float(load.row() @ self._weights)

    def _fit(self) -> np.ndarray | None:
        if not self._with_prompt:
            return None
        samples = [*self._decode_only, *self._with_prompt]
        x = np.array([row for row, _ in samples])
        y = np.array([seconds for _, seconds in samples])
        weights = _nonnegative_lstsq(x, y)
        residual = np.abs(x @ weights - y)
        typical = float(np.median(residual))
        keep = residual <= OUTLIER_FACTOR * typical + 1e-4
        if not keep.all() and keep.sum() >= x.shape[1]:
            weights = _nonnegative_lstsq(x[keep], y[keep])
        return weights


def _nonnegative_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every weight >= 0: drop the most negative term and
    refit until none is left (four terms: a handful of solves at most).
    Columns are scaled to a common range first, since attention pairs run
    to millions while the constant term is 1."""
    scale = np.abs(x).max(axis=0)
    scale[scale == 0] = 1.0
    xs = x / scale
    active = list(range(x.shape[1]))
    weights = np.zeros(x.shape[1])
    while active:
        solution, *_ = np.linalg.lstsq(xs[:, active], y, rcond=None)
        if (solution >= 0).all():
            weights[active] = solution
            break
        del active[int(np.argmin(solution))]
    scaled: np.ndarray = weights / scale
    return scaled


class PromptBudget:
    """The prompt tokens the next step may read, from a target step time
    (`target_ms`; 0 disables the budget) and the fitted step cost."""

    def __init__(self, target_ms: float) -> None:
        self.target_sec = max(0.0, target_ms) / 1000.0
        self.cost = StepCostModel()
        self.tokens = 0  # the last budget handed out (for stats)
        self.step_sec = 0.0  # moving average of measured step time
        # Moving average of the time between one step's end and the next
        # one's start while streams run (the worker loop sending frames and
        # reading requests): a stream's gap is that plus the step.
        self.outside_sec = 0.0
        self._ratios: deque[float] = deque(maxlen=RATIO_WINDOW)

    @property
    def enabled(self) -> bool:
        return self.target_sec > 0

    def allow(self, decoding: bool, most: int, load_for: Callable[[int], StepLoad]) -> int:
        """Prompt tokens for the next step: `most` (the engine's largest
        efficient chunk) when nothing decodes or the budget is off; else the
        largest count whose predicted step time (times the recent
        measured/predicted p90) stays within the target, but never less
        than the decode's own share (see _equal_share). `load_for(n)` says
        what the step would compute if it read n prompt tokens."""
        if not self.enabled or not decoding or most <= 1:
            self.tokens = most
            return most
        # Grow at most 2x past the largest chunk measured beside decodes
        # (from one token per decoding sequence): a cold or stale fit must
        # not send one huge chunk into the streams.
        floor = max(1, load_for(0).decode_tokens)
        cap = min(most, max(floor, 2 * self.cost.largest_prompt_chunk))
        slack = self._slack()

        aim = TAIL_HEADROOM * self.target_sec - self.outside_sec

        def fits(n: int) -> bool:
            predicted = self.cost.predict(load_for(n))
            return predicted is None or predicted * slack <= aim

        if fits(cap):
            allowed = cap
        else:
            low, high = 0, cap  # fits(low) (0: nothing to read), not fits(high)
            while high - low > 1:
                mid = (low + high) // 2
                if fits(mid):
                    low = mid
                else:
                    high = mid
            allowed = max(low, self._equal_share(cap, load_for))
        self.tokens = allowed
        return allowed

    def _equal_share(self, cap: int, load_for: Callable[[int], StepLoad]) -> int:
        """The prompt tokens that cost about what the step's decoding costs,
        and at least as many as it decodes. The prompt always gets that much
        of a step: when decoding alone (or a loaded host) eats the target,
        the streams slow to about half speed instead of the prompt starving
        at a token a step. The token floor holds when the fit cannot yet
        (or, on a host too noisy to fit, cannot at all) tell decode cost
        from prompt cost."""
        decode = load_for(0)
        floor = min(cap, max(1, decode.decode_tokens))
        decode_only = self.cost.predict(decode)
        if decode_only is None or not self.cost.knows_decoding:
            return floor
        low, high = floor, cap
        while high - low > 1:
            mid = (low + high) // 2
            if (self.cost.predict(load_for(mid)) or 0.0) <= 2 * decode_only:
                low = mid
            else:
                high = mid
        return low

    def _slack(self) -> float:
        if not self._ratios:
            return 1.0
        return max(1.0, float(np.quantile(np.array(self._ratios), RATIO_QUANTILE)))

    def note_outside(self, seconds: float) -> None:
        """Time between two back-to-back steps while streams run; longer
        pauses (the loop waited for work) are not the loop's cost."""
        if 0 <= seconds < self.target_sec:
            self.outside_sec = (seconds if self.outside_sec == 0
                                else 0.9 * self.outside_sec + 0.1 * seconds)

    def observe(self, load: StepLoad, seconds: float) -> None:
        """Record a step's measured time (only steps that computed something)."""
        if load.decode_tokens and load.prompt_tokens and self.enabled:
            predicted = self.cost.predict(load)
            if predicted:
                self._ratios.append(seconds / predicted)
        self.cost.observe(load, seconds)
        self.step_sec = seconds if self.step_sec == 0 else 0.9 * self.step_sec + 0.1 * seconds
