"""The transfer plan of one round transition (IST Alg. 1 and ResIST Alg. 1: collect,
average over holders, dispatch the next assignment), as seen by one subnet group.

Pure and cacheable: a function of the two assignments (themselves pure functions of
seed and round), the fields that travel and this group's index, so the plan of round
``r -> r+1`` is built before the round's sync and the sync itself only packs, sends and
unpacks. Nothing here communicates; a plan can be built and checked in one process.

Four units, each with one job:

* :mod:`.layout`: where a tensor's elements live in one round (:class:`Layout`): whole
  in each holder's subnet, or cut along dims 0 and/or 1 into disjoint per-group index
  sets, with elements nobody holds in their row's owner shard (:func:`owner_rows`);
* :mod:`.cells`: the geometry of a transition: cells of elements with the same place now
  and next, merged into row x column :class:`Box` es (never a map per element), and the
  round's lower bound counted on the cells (:func:`field_bound`, docs/cost.md);
* :mod:`.box_io`: a box's local rows and columns in a group's tensors, read and written
  (:func:`read_box`, :func:`write_box`);
* :mod:`.plan`: the :class:`TransferPlan` of one group, message by message
  (:func:`build_plan`). Every group derives the same boxes in the same order from the
  shared assignments, which fixes every message's layout without a handshake.
"""

from .box_io import compact_index, local_index, read_box, write_box
from .cells import Box, field_bound, located_boxes
from .layout import FieldSpec, Layout, layouts, owner_group, owner_rows
from .plan import Average, Segment, TransferPlan, build_plan, shared_in_messages, shared_rides_messages

__all__ = ["Average", "Box", "FieldSpec", "Layout", "Segment", "TransferPlan", "build_plan", "compact_index",
           "field_bound", "layouts", "local_index", "located_boxes", "owner_group", "owner_rows", "read_box",
           "shared_in_messages", "shared_rides_messages", "write_box"]
