"""The segments of the mask segmentation, kept current for the panel's "Mask segment" list.

A segmentation node's ``ModifiedEvent`` does not fire when segments are added, renamed or
removed; its ``vtkSegmentation`` reports those with its own events (``SegmentAdded``,
``SegmentRemoved``, ``SegmentModified``, ``SegmentsOrderModified``). :class:`SegmentList`
observes them, so a deleted segment never stays in the list and never reaches Apply.
"""

from __future__ import annotations

from typing import Callable, Optional

import slicer
from vtkmodules.vtkCommonCore import vtkCommand

SEGMENT_EVENTS = (slicer.vtkSegmentation.SegmentAdded, slicer.vtkSegmentation.SegmentRemoved,
                  slicer.vtkSegmentation.SegmentModified, slicer.vtkSegmentation.SegmentsOrderModified)


class SegmentList:
    """The (segment ID, name) pairs of one segmentation node, and a callback when they change.

    ``on_change`` is called after every segment event, and when the observed node is replaced
    by :meth:`set_segmentation_node`. Call :meth:`close` to stop observing.
    """

    def __init__(self, on_change: Callable[[], None]):
        self.on_change = on_change
        self.node = None
        self._segmentation = None
        self._tags: list[tuple] = []

    def set_segmentation_node(self, node) -> None:
        self._remove_observers()
        self.node = node
        if node is not None:
            self._observe(node)
        self.on_change()

    def _observe(self, node) -> None:
        self._segmentation = node.GetSegmentation()
        for event in SEGMENT_EVENTS:
            self._tags.append((self._segmentation, self._segmentation.AddObserver(event, self._changed)))
        # The node may be given a new vtkSegmentation object (scene import): follow it.
        self._tags.append((node, node.AddObserver(slicer.vtkMRMLSegmentationNode.SegmentationChangedEvent,
                                                  self._segmentation_replaced)))
        self._tags.append((node, node.AddObserver(vtkCommand.DeleteEvent, self._node_deleted)))

    def _remove_observers(self) -> None:
        for obj, tag in self._tags:
            obj.RemoveObserver(tag)
        self._tags = []
        self._segmentation = None

    def _changed(self, caller=None, event=None) -> None:
        self.on_change()

    def _segmentation_replaced(self, caller=None, event=None) -> None:
        if self.node is not None and self.node.GetSegmentation() is not self._segmentation:
            node = self.node
            self._remove_observers()
            self._observe(node)
        self.on_change()

    def _node_deleted(self, caller=None, event=None) -> None:
        self._tags = []
        self.node = None
        self.on_change()

    def close(self) -> None:
        self._remove_observers()
        self.node = None

    def segments(self) -> list[tuple[str, str]]:
        """(segment ID, name) in the segmentation's order; empty without a node."""
        if self.node is None:
            return []
        segmentation = self.node.GetSegmentation()
        out = []
        for n in range(segmentation.GetNumberOfSegments()):
            segment_id = segmentation.GetNthSegmentID(n)
            out.append((segment_id, segmentation.GetSegment(segment_id).GetName()))
        return out

    def choose(self, segment_id: Optional[str]) -> Optional[str]:
        """``segment_id`` while it exists, else the first segment, else None."""
        ids = [sid for sid, _ in self.segments()]
        if segment_id in ids:
            return segment_id
        return ids[0] if ids else None
