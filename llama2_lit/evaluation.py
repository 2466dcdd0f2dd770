"""Evaluation on the toy world: greedy answers judged by the oracle, summarised per suite.

The suites mirror what the paper measures with humans (sections 3.4 and 4.4), with the oracle
(``llama2_lit.data.oracle.judge``) as the judge:

* **helpfulness** — mean oracle helpfulness in [0, 1] and the share of exactly correct answers,
  per prompt category (task, harmful, borderline);
* **violation rate** — share of unsafe answers (paper 4.4: a violation is a rating of 1 or 2);
* **false refusals** — share of refusals on benign prompts that merely look risky (paper Fig 33's
  borderline set); refusing harmful prompts is what we want, so refusals are reported per category.

Stage callbacks (SFT's ``OracleHelpfulness``), the notebooks and the pipeline's report all use
these functions, so a number means the same thing wherever it appears.
"""

from __future__ import annotations

from typing import Any

from llama2_lit.model import Transformer
from llama2_lit.tokenizer import Tokenizer


def oracle_answers(model: Transformer, tokenizer: Tokenizer, records: list[dict], *, max_new_tokens: int = 64,
                   batch_size: int = 16) -> list[dict[str, Any]]:
    """Greedy answers of ``model`` to the prompts of ``records``, judged by the toy world's oracle.

    ``records`` are ``prompts`` records (messages ending with the user turn) or ``chat`` records
    (the final assistant turn is dropped: it is the reference answer). Returns one dict per
    record: ``messages`` (the prompt), ``response`` (text), ``judgement`` (``oracle.Judgement``).
    Every rank of a sharded model must call this with the same records (FSDP gathers weights
    collectively, so all ranks decode in lockstep).
    """
    from llama2_lit.chat import encode_prompt
    from llama2_lit.data.oracle import judge
    from llama2_lit.generation import generate
    from llama2_lit.parallelize import prepare_for_inference_mode

    prompts = [r["messages"][:-1] if r["messages"][-1]["role"] == "assistant" else r["messages"] for r in records]
    room = model.config.max_seq_len - max_new_tokens
    encoded = [encode_prompt(tokenizer, messages, max_len=room) for messages in prompts]
    prepare_for_inference_mode(model, tokenizer.bos_id)  # generate() runs in inference mode
    results = []
    for start in range(0, len(encoded), batch_size):
        out = generate(model, encoded[start:start + batch_size], max_new_tokens=max_new_tokens, temperature=0.0,
                       eos_id=tokenizer.eos_id)
        for row, length in enumerate(out.response_lengths.tolist()):
            ids = out.response_ids[row, :length].tolist()
            if out.eos_emitted[row]:
                ids = ids[:-1]
            index = start + row
            response = tokenizer.decode(ids)
            results.append({"messages": prompts[index], "response": response,
                            "judgement": judge(prompts[index], response, records[index].get("meta"))})
    return results


def helpfulness_summary(results: list[dict[str, Any]]) -> dict[str, float]:
    """Mean helpfulness (overall and per category) and violation rate of ``oracle_answers`` output."""
    judgements = [r["judgement"] for r in results]
    summary = {"helpfulness": _mean(j.helpfulness for j in judgements),
               "violation": _mean(j.violation for j in judgements)}
    for category in sorted({j.category for j in judgements}):
        summary[f"helpfulness_{category}"] = _mean(j.helpfulness for j in judgements if j.category == category)
    return summary


def suite_summary(results: list[dict[str, Any]]) -> dict[str, float]:
    """Everything the report shows for one suite: helpfulness, accuracy, violations, refusals."""
    judgements = [r["judgement"] for r in results]
    summary = {"n": float(len(judgements)), **helpfulness_summary(results),
               "refusal": _mean(j.refusal for j in judgements)}
    graded = [j.correct for j in judgements if j.correct is not None]
    if graded:
        summary["accuracy"] = _mean(graded)
    return summary


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")
