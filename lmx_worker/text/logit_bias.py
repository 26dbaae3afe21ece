"""OpenAI's `logit_bias` in the worker, for both backends.

The bias is added to the logits row of the one request that asked, at the
point where the engine applies the grammar mask, so batch mates neither
see it nor pay for it. -100 (the bottom of OpenAI's range) is a ban: the
token's logit becomes -inf, so even a peaked distribution cannot pick it;
+100 is added as is, which in practice makes the token certain (as OpenAI
describes it: "exclusive selection"). Token ids are the model's own; one
outside its vocabulary is a client error naming `logit_bias`.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from lmx_worker.engines.engine import RequestError

BAN = -100.0


def check_logit_bias(bias: dict[int, float], vocab: int) -> None:
    for token in bias:
        if not 0 <= token < vocab:
            raise RequestError(
                "invalid_request",
                f"logit_bias names token id {token}, outside this model's vocabulary "
                f"(0..{vocab - 1})", param="logit_bias")


def bias_row(bias: dict[int, float], width: int) -> npt.NDArray[np.float32]:
    """A dense row of `width` values to add to the logits (0 elsewhere);
    one vector add per step for the request, whatever the number of ids."""
    row = np.zeros(width, dtype=np.float32)
    for token, value in bias.items():
        row[token] = -np.inf if value <= BAN else value
    return row


class LogitBias:
    """A request's bias, applied in place to a numpy logits row (llama.cpp's
    buffer: the sampler chain then reads the biased row)."""

    def __init__(self, bias: dict[int, float], vocab: int) -> None:
        check_logit_bias(bias, vocab)
        self._ids = np.array(sorted(bias), dtype=np.int64)
        values = np.array([bias[t] for t in sorted(bias)], dtype=np.float32)
        self._values = np.where(values <= BAN, np.float32(-np.inf), values)

    def apply(self, row: npt.NDArray[np.float32]) -> None:
        row[self._ids] += self._values
