"""The floor of any Python nbdkit plugin (bench workload 14): ``pread``/``pwrite``
on one file and nothing else -- no undo, no bookkeeping.

    nbdkit python bench/trivial_plugin.py file=IMAGE

What nbd-mc's server CPU per request is compared with: the difference is our own
work, the rest (nbdkit, the embedded interpreter, the call into Python) any Python
plugin pays.
"""

import os

import nbdkit

API_VERSION = 2
_file = None


def config(key, value):
    global _file
    if key != "file":
        raise RuntimeError(f"unknown parameter {key}")
    _file = os.path.abspath(value)


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):  # noqa: A001 - nbdkit's callback name
    return os.open(_file, os.O_RDONLY if readonly else os.O_RDWR)


def close(fd):
    os.close(fd)


def get_size(fd):
    return os.fstat(fd).st_size


def pread(fd, buf, offset, flags):
    view = memoryview(buf)
    n = os.preadv(fd, [view], offset)
    if n < len(view):
        view[n:] = bytes(len(view) - n)


def pwrite(fd, buf, offset, flags):
    os.pwrite(fd, buf, offset)


def flush(fd, flags):
    os.fdatasync(fd)
