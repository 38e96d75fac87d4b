"""The RLM paper's protocol (Zhang, Kraska, Khattab, arXiv 2512.24601), for models that write code.

The root model never sees the context: it sees its size and first characters, and writes Python in
```repl``` blocks that run in a namespace holding `context` (str), `llm_query(prompt) -> str` (one
sub-call), `rlm_query(prompt) -> str` (a nested RLM over `prompt`, down to `max_depth`, then plain
`llm_query`) and `FINAL(answer)`. Each turn's printed output (cut to 2,000 characters) goes back to the
root. Budgets: `max_iterations` root turns, `max_calls` model calls and `max_total_tokens` tokens over
all of them; a budget that runs out ends the run with the error named in `RLMResult.error`.

The model's code runs in this process with `exec`, as the official client's "local" environment
does: use it only with models and prompts you trust.
"""

from __future__ import annotations

import contextlib
import io
import re
import traceback

SYSTEM = """You answer a query about a long context that you cannot see directly. It is stored in a Python REPL.
In the REPL you have:
- `context`: a str with the whole context ({n_chars} characters).
- `llm_query(prompt)`: asks a language model one question and returns its answer (a str). It can read about {chunk_chars} characters per call: give it slices of `context`.
- `FINAL(answer)`: call it with your final answer when you are done.
Write Python code in a ```repl``` block; you will see what it prints. Example:
```repl
answers = []
for i in range(0, len(context), {chunk_chars}):
    answers.append(llm_query("Answer: QUERY\\n\\n" + context[i:i + {chunk_chars}]))
print(answers)
```
The context starts with: {head!r}"""
TURN = "Query: {query}\nWrite the next ```repl``` block (call FINAL(answer) when you know the answer)."
CODE = re.compile(r"```(?:repl|python|py)?\s*\n(.*?)```", re.DOTALL)
MAX_OUTPUT = 2000


class _Final(Exception):
    def __init__(self, answer):
        self.answer = str(answer)


def run_repl(rlm, query: str, context: str, calls: list, depth: int = 0) -> tuple[str, str | None]:
    """Run the protocol for `rlm` (a RecursiveLanguageModel); returns (answer, error or None)."""
    from permkv.rlm.model import RLMBudgetExceeded

    lm = rlm.lm
    chars_per_call = rlm.context_chunk_size * int(rlm.kv_cache_compression_ratio) * 3  # ~3 characters a token

    def tokens_used() -> int:
        return sum(c.prompt_tokens + c.completion_tokens for c in calls)

    def check_tokens():
        if rlm.max_total_tokens is not None and tokens_used() > rlm.max_total_tokens:
            raise RLMBudgetExceeded(f"max_total_tokens={rlm.max_total_tokens} exceeded ({tokens_used()} used)")

    def llm_query(prompt) -> str:
        check_tokens()
        prompt = str(prompt)
        return rlm.call(prompt, level=depth + 1, role="sub", context_tokens=lm.count(prompt), calls=calls)

    def rlm_query(prompt) -> str:
        if depth + 1 >= rlm.max_depth:
            return llm_query(prompt)
        answer, error = run_repl(rlm, str(prompt), str(prompt), calls, depth + 1)
        return answer if error is None else f"[rlm_query stopped: {error}]"

    def final(answer):
        raise _Final(answer)

    namespace = {"context": context, "llm_query": llm_query, "rlm_query": rlm_query, "FINAL": final}
    messages = [{"role": "system", "content": SYSTEM.format(n_chars=len(context), chunk_chars=chars_per_call,
                                                            head=context[:200])}]
    try:
        for _ in range(rlm.max_iterations):
            check_tokens()
            messages.append({"role": "user", "content": TURN.format(query=query)})
            reply = rlm.call(messages, level=depth, role="root", context_tokens=0, calls=calls,
                             max_new_tokens=rlm.repl_max_new_tokens)
            messages.append({"role": "assistant", "content": reply})
            blocks = CODE.findall(reply)
            if not blocks:
                messages.append({"role": "user", "content": "No ```repl``` block found: write code, or call FINAL(answer)."})
                continue
            out = io.StringIO()
            for code in blocks:
                try:
                    with contextlib.redirect_stdout(out):
                        exec(code, namespace)  # noqa: S102 - the protocol runs the model's code
                except _Final:
                    raise
                except RLMBudgetExceeded:
                    raise
                except Exception:  # the model's bug: show it the traceback, as a REPL would
                    out.write(traceback.format_exc(limit=1))
            text = out.getvalue()
            messages.append({"role": "user", "content": "REPL output:\n" + (text[:MAX_OUTPUT] or "(nothing printed)")})
    except _Final as done:
        return done.answer, None
    except RLMBudgetExceeded as err:
        return "", str(err)
    except ValueError as err:  # e.g. the root's growing history no longer fits the model
        return "", f"{type(err).__name__}: {err}"
    return "", f"max_iterations={rlm.max_iterations} reached without FINAL(answer)"
