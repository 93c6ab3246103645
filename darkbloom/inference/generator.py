"""The batch generator the engine steps: mlx-lm's `BatchGenerator`, with a new request's first token reported one step sooner.

In mlx-lm 0.32.2 a step (`BatchGenerator.next()`) first decodes the running batch, then moves
the prompts whose prefill is done (one token left) into generation, which computes their first
token, and then prefills newer arrivals. That first token is only reported by the following
step, after the newer arrivals' prefill and another decode pass: when requests arrive spread
out (as they do over a network), every request waits one extra step for its first token.

`new_generator` builds one (`EagerStartGenerator`, defined once mlx-lm is imported) that moves the finished prompts into generation at the start of the step
instead, so the decode pass of the same step reports their first token. The work done is the
same (the same forward passes, in a different order); only when the first token is reported
changes. It relies on three private attributes of mlx-lm 0.32.2's `BatchGenerator`
(`_currently_processing`, `_prompt_batch`, `_generation_batch`); when they are missing it
behaves exactly like its parent.
"""

from __future__ import annotations

from typing import Any

__all__ = ["new_generator", "prompts_to_prefill"]


def new_generator(model: Any, **kwargs: Any) -> Any:
    """A batch generator for `model` (kwargs as for mlx-lm's `BatchGenerator`)."""
    return _generator_class()(model, **kwargs)


def prompts_to_prefill(gen: Any) -> int:
    """How many prompts the next step of `gen` prefills; 0 for a step that only decodes.

    Waiting prompts count, and prompts in the prompt batch with more than their last token left:
    a prompt down to its last token only starts generating, which is a decode-sized pass (the
    engine's thread tuner must not time that step as a prefill)."""
    waiting = len(getattr(gen, "_unprocessed_sequences", ()) or ())
    processing = getattr(gen, "_currently_processing", None)
    if processing is None:  # not mlx-lm 0.32.2's layout: count the whole prompt batch
        return waiting + len(getattr(gen, "_prompt_batch", ()) or ())
    return waiting + sum(1 for seq in processing if not _ready(seq))


def _ready(seq: Any) -> bool:
    """A prompt in processing with only its last token left (one segment of length one)."""
    return len(seq[0]) == 1 and len(seq[0][0]) == 1


_CLASS: Any = None


def _generator_class() -> Any:
    global _CLASS
    if _CLASS is None:
        from mlx_lm.generate import BatchGenerator

        class EagerStartGenerator(BatchGenerator):  # type: ignore[misc,valid-type]
            """mlx-lm's BatchGenerator; prompts that finished prefill start generating before the decode pass."""

            def _next(self) -> Any:
                self._start_finished_prompts()
                return super()._next()

            def _start_finished_prompts(self) -> None:
                processing = getattr(self, "_currently_processing", None)
                if not processing or not hasattr(self, "_prompt_batch") or not hasattr(self, "_generation_batch"):
                    return
                # A prompt is done with prefill when all that is left is its last token: that
                # token's forward pass gives the first output token.
                ready = [i for i, seq in enumerate(processing) if _ready(seq)]
                if not ready:
                    return
                last_tokens = [processing[i][0][0] for i in ready]
                self._currently_processing = [seq for i, seq in enumerate(processing) if i not in set(ready)]
                started = self._prompt_batch.split(ready).generate(last_tokens)
                self._generation_batch.extend(started)

        _CLASS = EagerStartGenerator
    return _CLASS
