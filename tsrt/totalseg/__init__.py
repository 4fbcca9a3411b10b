"""The TotalSegmentator task layer: the task registry's models run in order, with TotalSegmentator's own
geometry and postprocessing steps, and the files `TotalSegmentator` writes.

`tsrt.totalseg.segment` is the task-level entry point (`tsrt.segment`, like TotalSegmentator's python API).
"""

from tsrt.totalseg.task import segment

__all__ = ["segment"]
