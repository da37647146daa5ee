"""The control protocol's wire format in-process: framing, strict request
parsing and reply encoding (nbd_mc/control/wire.py), without any server."""

from __future__ import annotations

import json
import socket

import pytest

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
