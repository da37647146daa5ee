"""Words that fit the situation (issue 23): what a failed-over primary's protect
tells its operator, and what `serve` says when nbdkit cannot start."""

from __future__ import annotations

from nbd_mc.primary.console import failure_advice
from nbd_mc.primary.report import Report
from nbd_mc.secondary.launch import _nbdkit_failure


def test_a_failed_over_primary_is_told_to_stop_its_vm_not_to_protect_again():
    r = Report(attached=True, refused=True, committed=7,
               error="commit refused: this node was promoted to primary by a failover")
    advice = failure_advice(r)
    assert "FAILED OVER" in advice and "STOP THIS VM NOW" in advice and "split brain" in advice
    assert "UNPROTECTED" not in advice and "Do not run `nbd-mc protect`" in advice
    # a secondary refused for another reason (fenced) keeps the old advice
    r = Report(attached=True, refused=True, committed=7,
               error="commit refused: the group is fenced (generation 3)")
    assert "UNPROTECTED" in failure_advice(r)


def test_a_startup_failure_names_the_exception_behind_nbdkits_last_line():
    log = """nbdkit: python[1]: error: Traceback (most recent call last):
  File "/repo/plugins/nbd_mc.py", line 3, in <module>
    import ssl
  File "/usr/lib/python3.11/ssl.py", line 100, in <module>
    import _ssl             # if we can't import it, let the error propagate
ModuleNotFoundError: No module named '_ssl'
nbdkit: error: /repo/plugins/nbd_mc.py: error running this script
"""
    assert _nbdkit_failure(log) == ("nbdkit: error: /repo/plugins/nbd_mc.py: error running "
                                    "this script (cause: ModuleNotFoundError: No module "
                                    "named '_ssl')")
    prefixed = "nbdkit: python: error: ImportError: libssl.so.3: cannot open\n" \
               "nbdkit: error: x.py: error running this script\n"
    assert "(cause: nbdkit: python: error: ImportError: libssl.so.3" in _nbdkit_failure(prefixed)
    assert _nbdkit_failure("nbd-mc: the state directory is in use\n") == \
        "the state directory is in use"
    assert _nbdkit_failure("") == "nbdkit exited without a message"
