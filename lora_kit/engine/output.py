"""The output stage: each request's generated token ids become streamed text events.

After every sampled token, :meth:`OutputProcessor.process` decides whether it ends the
request (a stop token, a finished grammar, ``max_tokens``, the model's context), decodes the
new text incrementally, cuts it at the first stop string, and streams what is safe to show:
text that may still become a stop string, an incomplete UTF-8 character, or a reply that may
be turning into a tool call is held back. :meth:`OutputProcessor.final` builds the last
event; a reply that is a complete call of one of the request's tools finishes as
``tool_calls`` with the parsed call instead of text.
"""

from __future__ import annotations

from typing import Any

from lora_kit.engine.constraints import parse_tool_call
from lora_kit.engine.sequence import OutputState, Sequence
from lora_kit.engine.types import GenerationOutput


class OutputProcessor:
    """Turns tokens into events for every request; runs in the engine loop's thread."""

    def __init__(self, tokenizer: Any, stop_ids: set[int], max_length: int) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.max_length = max_length

    def process(self, seq: Sequence) -> str | None:
        """Stream the text of the token ``seq`` just generated; the finish reason when it ends ``seq``."""
        params, state = seq.request.params, seq.output
        is_stop_token = seq.generated[-1] in self.stop_ids and not params.ignore_eos
        reason = self._finish_reason(seq, is_stop_token)
        before = len(state.decoded)
        ids = seq.generated[:-1] if is_stop_token else seq.generated  # a stop token has no text
        text = self._detokenize(state, ids, final=reason is not None)
        for stop in params.stop:
            # Only the new text (and the stop's length before it) can hold a new match.
            at = text.find(stop, max(0, before - len(stop) + 1)) if stop else -1
            if at >= 0 and (state.stop_at is None or at < state.stop_at):
                state.stop_at = at
        if state.stop_at is not None:
            text, reason = text[: state.stop_at], "stop"
        state.text = text
        if reason is None:
            self._emit(seq, self._safe_end(seq, text))
        return reason

    def final(self, seq: Sequence, reason: str) -> GenerationOutput:
        """The last event of ``seq``, finished for ``reason`` (``tool_calls`` when its reply is a call)."""
        state, tool_calls = seq.output, None
        if seq.constraint is not None and seq.constraint.tools and state.text.lstrip().startswith("{"):
            call = parse_tool_call(state.text.strip(), seq.request.tools or [])
            if call is not None:
                tool_calls, reason = [call], "tool_calls"
                state.text, state.emitted = "", 0
            else:
                state.emitted = 0  # an unfinished call is shown as the text it is
        return self._event(seq, len(state.text), finished=True, reason=reason, tool_calls=tool_calls)

    def _finish_reason(self, seq: Sequence, is_stop_token: bool) -> str | None:
        if is_stop_token or (seq.constraint is not None and seq.constraint.terminated):
            return "stop"
        if len(seq.generated) >= seq.request.params.max_tokens:
            return "length"
        if len(seq.request.prompt_ids) + len(seq.generated) >= self.max_length:
            return "length"
        return None

    def _detokenize(self, state: OutputState, ids: list[int], final: bool) -> str:
        """The text of ``ids``, decoded incrementally (a few tokens per step, not all of them):
        a token's text is taken once the tokens after the last complete character decode
        cleanly (byte-level BPE may split one character over several tokens)."""
        prefix = self.tokenizer.decode(ids[state.prefix_offset : state.read_offset], skip_special_tokens=True)
        new = self.tokenizer.decode(ids[state.prefix_offset :], skip_special_tokens=True)
        if len(new) > len(prefix) and (final or not new.endswith("\ufffd")):
            state.decoded += new[len(prefix) :]
            state.prefix_offset, state.read_offset = state.read_offset, len(ids)
        return state.decoded

    @staticmethod
    def _safe_end(seq: Sequence, text: str) -> int:
        """How much of ``text`` can be streamed now: hold back a possible stop-string start,
        an incomplete UTF-8 character, and a reply that may be turning into a tool call."""
        end, emitted = len(text), seq.output.emitted
        if seq.constraint is not None and seq.constraint.tools and text.lstrip()[:1] in ("", "{"):
            return emitted
        if text.endswith("\ufffd"):
            end -= 1
        for stop in seq.request.params.stop:
            for n in range(min(len(stop) - 1, end), 0, -1):
                if text[:end].endswith(stop[:n]):
                    end = min(end, len(text[:end]) - n)
                    break
        return max(end, emitted)

    def _emit(self, seq: Sequence, end: int) -> None:
        """Stream the text up to ``end`` not sent yet; nothing new: the ids ride with the next event."""
        if end > seq.output.emitted:
            seq.push(self._event(seq, end, finished=False))

    @staticmethod
    def _event(
        seq: Sequence, end: int, finished: bool, reason: str | None = None, tool_calls: list | None = None
    ) -> GenerationOutput:
        """The text up to ``end`` not sent yet, with the token ids generated since the last event."""
        state = seq.output
        delta = state.text[state.emitted : end]
        state.emitted = max(state.emitted, end)
        new_ids, state.sent_ids = seq.generated[state.sent_ids :], len(seq.generated)
        return GenerationOutput(
            text=delta,
            token_ids=new_ids,
            finished=finished,
            finish_reason=reason,
            prompt_tokens=len(seq.request.prompt_ids),
            completion_tokens=len(seq.generated),
            tool_calls=tool_calls,
        )
