"""The task contract: what the run, the builder and the methods may use of any task.

Every task (:class:`~mtneuro_lab.data.tasks.CubeTask` and its subclasses, the Task 3
:class:`~mtneuro_lab.data.semantic_task.SemanticFeatureTask`,
:class:`~mtneuro_lab.data.em.EMTask`) derives from :class:`Task`. A task describes data: which
volumes or slices form the splits and what the targets are. It does not choose its datamodule
(:func:`mtneuro_lab.build.datamodule_class` does, by ``kind``) and it does not score predictions
(EM scoring: :func:`mtneuro_lab.methods.mae_finetune.evaluate_volume`).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

from mtneuro_lab.data.sources.base import VolumeSource


class Task(abc.ABC):
    """Base class of every task; attributes carry their defaults here, not in ``getattr`` calls."""

    #: which methods fit (a method class lists the kinds it runs on in ``task_kinds``), and which
    #: datamodule is built: classification | segmentation | semantic | em
    kind: ClassVar[str] = "base"
    #: what the source must provide (injected into ``source.*`` as ``modality``): xray | em
    modality: str = "xray"
    #: the task's name (``task.name``), used in log lines and messages
    name: str
    #: val/test windows touching training ones, set by :meth:`bind`; None for tasks without
    #: windows (EM volumes), whose runs record no ``split/touching``
    contacts: tuple[Any, ...] | None = None

    @abc.abstractmethod
    def bind(self, catalog: Any) -> Task:
        """Resolve the splits against the cube catalog (checks that splits never leak); returns self."""

    @abc.abstractmethod
    def check_source(self, source: VolumeSource) -> None:
        """Before any read: the source provides what the splits need (z range, x/y box, channels)."""

    @property
    @abc.abstractmethod
    def num_classes(self) -> int:
        """Outputs the network predicts (classes, or target channels)."""

    @property
    @abc.abstractmethod
    def class_names(self) -> list[str]:
        """One name per output."""

    @abc.abstractmethod
    def sample_shape(self) -> tuple[int, ...]:
        """Spatial shape of one sample: the model's ``input_shape``."""

    @abc.abstractmethod
    def build(self, split: str, source: VolumeSource) -> Any:
        """The arrays of one split (``SplitArrays`` for cube tasks, ``EMVolume`` for EM tasks)."""

    def log_contacts(self) -> None:  # noqa: B027 - optional hook, a no-op for tasks without windows
        """WARNING lines about val/test windows touching training ones (nothing without windows)."""
