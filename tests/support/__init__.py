"""Test support: servers under test, byte models, oracles, fault injection and
reports.  Imported by the tests as ``support.NAME``; none of it is a test."""
