"""The control protocol's wire format in-process: framing, strict request
parsing and reply encoding (nbd_mc/control/wire.py), without any server."""

from __future__ import annotations

import json
import socket

import pytest
from hypothesis import given, settings, strategies as st

from nbd_mc.control.wire import (NO_ID, LineReader, LineTooLong, Malformed, encode, error_reply,
                                 parse_request, reply_line)


def test_a_request_is_name_arguments_and_id():
    assert parse_request(b'{"execute":"commit","arguments":{"epoch":3},"id":7}') == \
        ("commit", {"epoch": 3}, 7)
    name, arguments, request_id = parse_request(b'{"execute":"query-status"}')
    assert (name, arguments, request_id) == ("query-status", {}, NO_ID)
    assert parse_request(b'{"execute":"x","id":null}')[2] is None, "null is an id"


@pytest.mark.parametrize("line, words, keeps_id", [
    (b"\xff\xfe", "not valid UTF-8", False),
    (b"{", "not valid JSON", False),
    (b'{"execute":"x","arguments":{"a":NaN}}', "not valid JSON", False),
    (b"[1]", "must be a JSON object, not array", False),
    (b'{"execute":"x","argument":{},"id":1}', "unexpected member 'argument'", True),
    (b'{"arguments":{},"id":2}', "'execute' must be a string naming the command, it is missing",
     True),
    (b'{"execute":5,"id":3}', "it is a number", True),
    (b'{"execute":"x","arguments":[],"id":4}', "'arguments' must be an object, not array", True),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply", False),
])
def test_a_malformed_request_is_refused_with_its_id_when_readable(line, words, keeps_id):
    with pytest.raises(Malformed, match=words) as e:
        parse_request(line)
    assert e.value.error_class == "BadRequest"
    assert (e.value.request_id is not NO_ID) == keeps_id


def test_replies_are_one_line_of_strict_json_with_the_id():
    assert reply_line({"return": {"a": 1}}, 9) == b'{"return":{"a":1},"id":9}\n'
    assert reply_line(error_reply("Fenced", "no"), NO_ID) == \
        b'{"error":{"class":"Fenced","desc":"no"}}\n'
    assert encode({"s": "\udc80"}).decode("ascii"), "a lone surrogate stays encodable"


@pytest.mark.parametrize("bad", [{1, 2}, float("nan"), object()])
def test_a_reply_json_cannot_express_costs_one_error_reply(bad):
    line = reply_line({"return": {"v": bad}}, "r")
    reply = json.loads(line)
    assert reply["id"] == "r" and reply["error"]["class"] == "GenericError"
    assert "could not be encoded" in reply["error"]["desc"]


def pair():
    a, b = socket.socketpair()
    return a, b


def test_line_reader_splits_joins_and_keeps_a_last_line_without_newline():
    a, b = pair()
    with a, b:
        r = LineReader(b, limit=100)
        a.sendall(b'{"x":1}\n{"y"')
        assert r.readline() == b'{"x":1}'
        a.sendall(b':2}\n\nlast')
        a.shutdown(socket.SHUT_WR)
        assert r.readline() == b'{"y":2}'
        assert r.readline() == b""
        assert r.readline() == b"last"
        assert r.readline() is None


def test_line_reader_refuses_a_line_over_the_limit_without_holding_it():
    a, b = pair()
    with a, b:
        r = LineReader(b, limit=1000)
        a.sendall(b"x" * 1001)
        with pytest.raises(LineTooLong):
            r.readline()
        a2, b2 = pair()
        with a2, b2:
            r2 = LineReader(b2, limit=10)
            a2.sendall(b"x" * 11 + b"\n")
            with pytest.raises(LineTooLong):
                r2.readline()


# --- strict parsing: a property test over the members of a request ------------------------
# A request is built as a list of (member, JSON text) pairs, so that it can hold what
# json.dumps of a dict cannot: the same member twice.  The oracle is the protocol's
# sentence "a request has exactly these members": execute (a string), optional
# arguments (an object), optional id; no member twice at any depth; every number finite.

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                 max_size=3),
    max_leaves=6)
_NON_FINITE = ["1e400", "-1e400", "1E999", "NaN", "Infinity", "-Infinity", "123e4567"]


def _text(value) -> str:
    return json.dumps(value)


def _object(pairs) -> str:
    return "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in pairs) + "}"


@st.composite
def _requests(draw):
    """(line, the refusal expected or None, the name, the arguments)."""
    name = draw(st.sampled_from(["query-status", "commit", "quit", "x"]))
    arg_pairs = [(k, _text(v)) for k, v in
                 draw(st.dictionaries(st.sampled_from(["epoch", "writer", "instant", "a"]),
                                      _json_values, max_size=3)).items()]
    pairs = [("execute", _text(name))]
    if draw(st.booleans()):
        pairs.append(("arguments", None))   # filled in below
    if draw(st.booleans()):
        pairs.append(("id", _text(draw(_json_values))))
    fault = draw(st.sampled_from(["none", "duplicate", "duplicate-argument", "missing",
                                  "extra", "non-finite", "nested-duplicate"]))
    expect = None
    if fault == "duplicate":
        member, text = draw(st.sampled_from(pairs))
        pairs.insert(draw(st.integers(0, len(pairs))), (member, text if text else "{}"))
        expect = "appears more than once"
    elif fault == "duplicate-argument" and arg_pairs:
        arg_pairs.append((arg_pairs[0][0], draw(st.sampled_from(['"quit"', "1", "{}"]))))
        expect = "appears more than once"
    elif fault == "missing":
        pairs = [p for p in pairs if p[0] != "execute"]
        expect = "'execute' must be a string"
    elif fault == "extra":
        pairs.append((draw(st.sampled_from(["argument", "Execute", "ID", "x"])), "1"))
        expect = "unexpected member"
    elif fault == "non-finite":
        arg_pairs.append(("stale_after", draw(st.sampled_from(_NON_FINITE))))
        expect = "not finite|not valid JSON"
    elif fault == "nested-duplicate":
        arg_pairs.append(("deep", '[{"k":1,"k":2}]'))
        expect = "appears more than once"
    if fault in ("duplicate-argument", "non-finite", "nested-duplicate") and \
            not any(k == "arguments" for k, _ in pairs):
        pairs.append(("arguments", None))
    if expect and fault in ("duplicate-argument",) and not arg_pairs:
        expect = None
    line = _object([(k, v if v is not None else _object(arg_pairs)) for k, v in pairs])
    return line.encode(), expect, name, dict((k, json.loads(v)) for k, v in arg_pairs) \
        if expect is None and any(k == "arguments" for k, _ in pairs) else {}


@settings(max_examples=400, deadline=None)
@given(_requests())
def test_parser_accepts_exactly_the_requests_the_protocol_describes(case):
    line, expect, name, arguments = case
    if expect is None:
        assert parse_request(line)[:2] == (name, arguments)
        return
    with pytest.raises(Malformed, match=expect) as e:
        parse_request(line)
    assert e.value.error_class == "BadRequest"


@pytest.mark.parametrize("line", [
    b'{"execute":"query-status","execute":"quit"}',
    b'{"execute":"quit","arguments":{},"arguments":{"x":1}}',
    b'{"execute":"commit","arguments":{"epoch":1,"epoch":2}}',
    b'{"execute":"x","id":1,"id":2}',
])
def test_a_duplicated_member_is_refused_not_the_last_one_run(line):
    with pytest.raises(Malformed, match="appears more than once"):
        parse_request(line)


@pytest.mark.parametrize("number", ["1e400", "-1e400", "1e309", "2e308"])
def test_a_number_that_is_not_finite_is_refused(number):
    with pytest.raises(Malformed, match="not finite"):
        parse_request(b'{"execute":"new-session","arguments":{"stale_after":%s}}'
                      % number.encode())
