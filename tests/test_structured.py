"""Grammar-constrained sampling on the offline engine (random weights: the constraint, not the model, makes the
output valid), and the replay that lets another rank (decode after handoff, a resumed request) continue a constrained
sequence from its tokens alone."""
import json
import re

import pytest
import torch

pytest.importorskip("xgrammar")

from rayinfer import LLM, SamplingParams  # noqa: E402
from rayinfer.engine.grammar import Grammars  # noqa: E402
from rayinfer.engine.sequence import Sequence  # noqa: E402

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny")


def test_json_schema_choice_and_regex_outputs_are_valid(llm):
    params = [SamplingParams(max_tokens=40, temperature=1.0, seed=s, structured=("json", json.dumps(SCHEMA)))
              for s in range(3)]
    outs = [llm.generate([[5, 6, 7 + i]], p, use_tqdm=False)[0] for i, p in enumerate(params)]
    for o in outs:
        assert o.finish_reason == "stop", (o.text, o.error)
        got = json.loads(o.text)
        assert set(got) == {"name", "age"} and isinstance(got["age"], int) and len(got["name"]) <= 6
    choice = llm.generate(["Pick"], SamplingParams(max_tokens=10, temperature=1.0, seed=1,
                                                   structured=("choice", json.dumps(["yes", "no way"]))),
                          use_tqdm=False)[0]
    assert choice.text in ("yes", "no way") and choice.finish_reason == "stop"
    rx = llm.generate(["Code"], SamplingParams(max_tokens=10, temperature=0,
                                               structured=("regex", r"[0-9]{3}-[a-c]{2}")), use_tqdm=False)[0]
    assert re.fullmatch(r"[0-9]{3}-[a-c]{2}", rx.text), rx.text
    unconstrained = llm.generate(["Code"], SamplingParams(max_tokens=6, temperature=0), use_tqdm=False)[0]
    assert not re.fullmatch(r"[0-9]{3}-[a-c]{2}", unconstrained.text)  # the model alone would not


def test_a_rank_new_to_a_sequence_replays_its_tokens(llm):
    """A fresh Grammars (another rank) given a sequence with `{"na` already generated allows only `me"`'s path."""
    tok = llm.tokenizer
    g = Grammars(tok, 320, [])
    seq = Sequence("r", [5, 6], SamplingParams(max_tokens=20, structured=("json", json.dumps(SCHEMA))))
    seq.token_ids.extend(tok.encode('{"na', add_special_tokens=False))
    masked = g.mask(torch.zeros(1, 320), [seq])
    allowed = [tok.decode([i]) for i in torch.nonzero(masked[0] == 0).flatten().tolist()]
    assert allowed and all('me"'.startswith(a) and a for a in allowed), allowed
    bad = Sequence("b", [5], seq.params)
    bad.token_ids.extend(tok.encode('[', add_special_tokens=False))
    with pytest.raises(ValueError, match="breaks"):
        g.mask(torch.zeros(1, 320), [bad])
