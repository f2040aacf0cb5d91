"""The JSON-schema prefix validator and the constrained-decoding logits processor.

Reference: `json.loads` + the `jsonschema` package. Every prefix of a valid document is accepted and
the whole document is complete; anything the validator calls complete parses and validates
(checked on thousands of random mutations); random "models" decoded through the processor always
produce valid documents.
"""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch
from serve_utils import tiny_tokenizer

from llmkit.generate.constrain import JsonLogitsProcessor, JsonPrefix, token_texts

PERSON = {
    "type": "object", "additionalProperties": False, "required": ["name", "age"],
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 10},
        "age": {"type": "integer"},
        "score": {"type": "number"},
        "ok": {"type": "boolean"},
        "nick": {"type": ["string", "null"]},
        "color": {"enum": ["red", "green", 3, None]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "pet": {"$ref": "#/$defs/pet"},
    },
    "$defs": {"pet": {"type": "object", "properties": {"kind": {"const": "cat"}, "legs": {"type": "integer"}},
                      "required": ["kind"]}},
}


def _accepts(v: JsonPrefix, text: str) -> tuple[bool, bool]:
    """(every prefix accepted, whole text complete)."""
    st = v.initial()
    for ch in text:
        st = v.feed(st, ch)
        if st is None:
            return False, False
    return True, v.complete(st)


def _random_person(rng: random.Random) -> dict:
    d = {
        "name": rng.choice(["a", "Zoé", 'q"uo\\te', "tab\there", "0123456789"]),
        "age": rng.randint(-50, 10**6),
    }
    opt = {
        "score": rng.choice([0, -1.5, 3.25e-3, 1e10]),
        "ok": rng.random() < 0.5,
        "nick": rng.choice([None, "x"]),
        "color": rng.choice(["red", "green", 3, None]),
        "tags": ["t"] * rng.randint(1, 3),
        "pet": rng.choice([{"kind": "cat"}, {"legs": 4, "kind": "cat"}]),
    }
    for k, v in opt.items():
        if rng.random() < 0.6:
            d[k] = v
    keys = list(d)
    rng.shuffle(keys)
    return {k: d[k] for k in keys}


def _dump(rng: random.Random, obj) -> str:
    return rng.choice(
        [
            lambda: json.dumps(obj),
            lambda: json.dumps(obj, indent=2),
            lambda: json.dumps(obj, separators=(",", ":")),
            lambda: json.dumps(obj, ensure_ascii=False),
        ]
    )()


def test_valid_documents_are_accepted():
    v = JsonPrefix(PERSON)
    rng = random.Random(0)
    for _ in range(300):
        doc = _random_person(rng)
        text = _dump(rng, doc)
        jsonschema.validate(doc, PERSON)
        assert _accepts(v, text) == (True, True), text


def test_complete_means_valid_under_mutations():
    """Soundness: whatever the validator calls complete parses and satisfies the schema."""
    v = JsonPrefix(PERSON)
    rng = random.Random(1)
    alphabet = list('{}[]",:0123456789-+.eE truefalsn\\x')
    complete = rejected = 0
    for _ in range(3000):
        text = list(_dump(rng, _random_person(rng)))
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(text))
            op = rng.random()
            if op < 0.4:
                text[i] = rng.choice(alphabet)
            elif op < 0.7:
                del text[i]
            else:
                text.insert(i, rng.choice(alphabet))
        s = "".join(text)
        ok, done = _accepts(v, s)
        if done:
            complete += 1
            jsonschema.validate(json.loads(s), PERSON)
        else:
            rejected += 1
    assert complete > 50 and rejected > 1000  # both outcomes were exercised


@pytest.mark.parametrize(
    "text,ok",
    [
        ('{"name": "x", "age": 1}', True),
        ('{"age": 1}', False),
        ('{"name": "", "age": 1}', False),
        ('{"name": "x", "age": 1.5}', False),
        ('{"name": "x", "age": 01}', False),
        ('{"name": "x", "age": 1,}', False),
        ('{"name": "x", "age": 1, "zz": 1}', False),
        ('{"name": "x", "age": 1, "name": "y"}', False),
        ('{"name": "x", "age": 1, "tags": []}', False),
        ('{"name": "x", "age": 1, "color": "blue"}', False),
        ('{"name": "x", "age": 1, "pet": {"kind": "dog"}}', False),
        ('{"name": "\\u00e9", "age": -0}', True),
        ('{"name": "x", "age": 1}  ', True),
        ('{"name": "x"\n,"age": 2}', True),
        ("[1]", False),
    ],
)
def test_hand_cases(text, ok):
    assert _accepts(JsonPrefix(PERSON), text)[1] is ok


def test_json_object_mode_accepts_any_object():
    v = JsonPrefix(None)
    for text in ["{}", '{"a": [1, {"b": null}], "c": "\\n", "d": -1.5e3, "e": [[], {}]}']:
        assert _accepts(v, text) == (True, True)
    for text in ["[]", '"x"', '{"a": tru}', '{"a" 1}', "{,}"]:
        assert not _accepts(v, text)[1]


@pytest.mark.parametrize("seed", [0])
def test_processor_with_random_logits_always_valid(seed):
    tok = tiny_tokenizer()
    texts = token_texts(tok)
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 6},
            "n": {"type": "integer"},
            "hot": {"type": "boolean"},
            "unit": {"enum": ["c", "f"]},
            "xs": {"type": "array", "items": {"type": "number"}, "maxItems": 2},
        },
        "required": ["city", "n", "hot", "unit", "xs"],
    }
    proc = JsonLogitsProcessor(schema, texts, set(tok.stop_ids))
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for _ in range(300):
        logits = 3 * torch.randn(tok.vocab_size, generator=g)  # a "model" with random preferences
        t = int(torch.multinomial(proc(out, logits).softmax(-1), 1, generator=g))
        out.append(t)
        if t in tok.stop_ids:
            break
    assert out[-1] in tok.stop_ids
    jsonschema.validate(json.loads(tok.decode(out[:-1])), schema)
