"""nbd-mc: the disk half of micro-checkpointing fault tolerance.

The secondary serves a replica image over NBD and, before overwriting a cluster for
the first time in an epoch, copies its old contents into a qcow2 undo overlay, so
that at any instant the overlay shows the disk as of the last committed checkpoint.
"""

__version__ = "0.1.0"
