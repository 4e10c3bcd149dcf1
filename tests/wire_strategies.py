"""Hypothesis strategies for hostile ZeroMQ messages (tests/unit/test_wire_fuzz.py, tests/test_hostile_zmq.py).

A message is a list of frames as a DEALER sends it: a header frame, then payload frames. Headers
are sometimes garbage bytes, sometimes msgpack of anything, mostly near-miss requests: the right
keys with wrong, huge, negative, inconsistent or mistyped values.
"""

from __future__ import annotations

import msgpack
from hypothesis import strategies as st

from models.spec import KSERVE_TO_NUMPY

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)  # msgpack strings: valid UTF-8
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), text,
                    st.binary(max_size=16))
anything = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.one_of(text, st.integers(-(2**63), 2**64 - 1)), inner, max_size=4)),
                        max_leaves=12)
datatypes = st.one_of(st.sampled_from([*KSERVE_TO_NUMPY, "BYTES", "FP128", ""]), anything)
dims = st.one_of(st.integers(0, 4), st.integers(-3, 2**64 - 1), st.booleans(), st.floats(), text)
shapes = st.one_of(st.lists(st.integers(0, 4), max_size=3), st.lists(dims, max_size=4), anything)


@st.composite
def tensor_descs(draw: st.DrawFn) -> object:
    desc = {"name": draw(st.one_of(text, anything)), "datatype": draw(datatypes), "shape": draw(shapes)}
    if draw(st.booleans()):
        desc["frame"] = draw(st.one_of(st.integers(-2, 4), anything))
    if draw(st.booleans()):
        desc["data"] = draw(st.one_of(st.lists(st.one_of(st.binary(max_size=8), text), max_size=4), anything))
    for key in draw(st.lists(st.sampled_from(["name", "datatype", "shape"]), max_size=1)):
        desc.pop(key, None)  # a descriptor missing a key
    return desc


@st.composite
def headers(draw: st.DrawFn) -> dict:
    header: dict = {}
    ops = st.one_of(st.sampled_from(["infer", "generate", "cancel", "live", "ready", "models", "metadata", "nope"]), anything)
    for key, values in (("v", st.one_of(st.integers(0, 3), anything)), ("id", anything), ("op", ops),
                        ("model", st.one_of(st.sampled_from(["tiny", "nope"]), anything)),
                        ("inputs", st.one_of(st.lists(tensor_descs(), max_size=3), anything)),
                        ("parameters", st.one_of(st.dictionaries(text, anything, max_size=3), anything)),
                        ("fwd", st.booleans())):
        if draw(st.integers(0, 9)) < 8:
            header[key] = draw(values)
    return header


def packed(header: object) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


header_frames = st.one_of(st.binary(max_size=64), anything.map(packed), headers().map(packed))
payload_frames = st.lists(st.one_of(st.binary(max_size=64), st.binary(min_size=0, max_size=8).map(lambda b: b * 16)),
                          max_size=4)
messages = st.tuples(header_frames, payload_frames).map(lambda t: [t[0], *t[1]])
