"""The undo overlay: a real qcow2 v3 file whose backing file is the replica image.

``format`` holds the on-disk layout (constants, geometry, header, creation,
validation of a file); ``overlay`` the UndoOverlay that preserves, drops and
applies.  docs/qcow2-undo.md describes the format and its crash ordering.
"""

from .format import (ALL_SUBCLUSTERS, EXT, EXT_BACKING_FORMAT, EXT_END, EXT_NBD_MC, HEADER,
                     HEADER_LENGTH, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPAT_EXTENDED_L2,
                     L2_RESERVED, MAGIC, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, NBD_MC_EXT,
                     NBD_MC_EXT_VERSION, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED,
                     OFLAG_ZERO, REFCOUNT_ORDER, ZERO_ENTRY, Geometry, Header, Layout,
                     backing_name_for, cluster_bits_of, create, read_layout, rebase, resolve_backing,
                     subclusters_possible)
from .overlay import ZERO_SOURCE, UndoOverlay, open_image

__all__ = ["create", "UndoOverlay", "Geometry", "Header", "open_image", "backing_name_for", "rebase",
           "resolve_backing", "cluster_bits_of", "subclusters_possible", "read_layout",
           "ZERO_SOURCE", "MAGIC", "HEADER", "HEADER_LENGTH", "EXT", "EXT_END",
           "EXT_BACKING_FORMAT", "EXT_NBD_MC", "NBD_MC_EXT", "NBD_MC_EXT_VERSION",
           "OFFSET_MASK", "OFLAG_COPIED", "OFLAG_COMPRESSED", "OFLAG_ZERO", "L2_RESERVED",
           "INCOMPAT_DIRTY", "INCOMPAT_CORRUPT", "INCOMPAT_EXTENDED_L2", "REFCOUNT_ORDER",
           "MIN_CLUSTER_BITS", "MAX_CLUSTER_BITS", "ZERO_ENTRY", "ALL_SUBCLUSTERS", "Layout"]
