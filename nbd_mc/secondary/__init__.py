"""The secondary: everything that runs inside nbdkit, and the commands that start it.

The engine (the group and its epochs), one disk, the persistent state, the I/O
synchronisation, the one-writer rule, the control command table, the nbdkit
callbacks adapter, and the offline tools that read a state directory (launch,
inspect, boot).  What nbdkit loads is standard library only, plus the shared
modules one level up (errors, fileio, qcow2, control wire, addresses, TLS, the
state directory's layout, the shared hashes): nbdkit's embedded Python loads this
package, never nbd_mc.primary or nbd_mc.cli (tests/unit/test_plugin_imports.py
checks it).  metrics.py (``status --prometheus``) runs in the command-line client
and is the one module here that needs prometheus_client.
"""
