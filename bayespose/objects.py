"""Scipion objects defined by bayespose.

pwem's ``Domain.getObjects()`` collects the ``pyworkflow.object.Object`` subclasses declared in a plugin's
``objects`` module, so that the project database (the mapper) can store and load them by class name and a
``PointerParam(pointerClass="BayesposePoseNetwork")`` finds them in the project.
"""

from __future__ import annotations

import os

from pwem.objects import EMFile
from pyworkflow.object import Float, Integer, String


class BayesposePoseNetwork(EMFile):
    """A trained pose-prediction network: the checkpoint file (``MODEL.pt``, written by
    :func:`bayespose.core.deep.train_pose_network`) plus what a protocol needs to check its inputs without opening
    it: the model type (``so3grid`` or ``quaternion``), the box (px) and pixel size (Å/px) of the training particles,
    the network box (px, the Fourier-cropped size the network sees), the point-group symmetry, the output grid's
    HEALPix order, the number of training particles and the best epoch with its validation median error (degrees).
    """

    def __init__(self, filename: str | None = None, **kwargs):
        EMFile.__init__(self, filename=filename, **kwargs)
        self._modelType = String(kwargs.get("modelType"))
        self._box = Integer(kwargs.get("box"))
        self._pixelSize = Float(kwargs.get("pixelSize"))
        self._netBox = Integer(kwargs.get("netBox"))
        self._symmetry = String(kwargs.get("symmetry"))
        self._gridOrder = Integer(kwargs.get("gridOrder"))
        self._nParticles = Integer(kwargs.get("nParticles"))
        self._bestEpoch = Integer(kwargs.get("bestEpoch"))
        self._valMedianErrorDeg = Float(kwargs.get("valMedianErrorDeg"))

    # -------------------------------------------------------------------------------------------- accessors
    def getModelType(self) -> str | None:
        """``so3grid`` (distribution on a HEALPix x in-plane grid) or ``quaternion`` (regression baseline)."""
        return self._modelType.get()

    def getBox(self) -> int | None:
        """Image side of the training particles, px."""
        return self._box.get()

    def getSamplingRate(self) -> float | None:
        """Pixel size of the training particles, Å/px."""
        return self._pixelSize.get()

    def getNetBox(self) -> int | None:
        """Side of the Fourier-cropped images the network sees, px."""
        return self._netBox.get()

    def getSymmetry(self) -> str | None:
        """Point group (RELION notation) the network was trained with."""
        return self._symmetry.get()

    def getGridOrder(self) -> int | None:
        """HEALPix order of the output grid (``so3grid``); None for the quaternion model."""
        return self._gridOrder.get()

    def getNumberOfParticles(self) -> int | None:
        """Number of particles the network was trained (and validated) on."""
        return self._nParticles.get()

    def getBestEpoch(self) -> int | None:
        """Epoch of the saved weights (lowest validation loss)."""
        return self._bestEpoch.get()

    def getValMedianErrorDeg(self) -> float | None:
        """Median angular error (degrees, symmetry-aware) on the validation particles at the best epoch."""
        return self._valMedianErrorDeg.get()

    def getFiles(self) -> set[str]:
        """The checkpoint file (Scipion copies / deletes these with the object)."""
        return {self.getFileName()} if self.getFileName() else set()

    def exists(self) -> bool:
        """True when the checkpoint file is on disk."""
        return bool(self.getFileName()) and os.path.isfile(self.getFileName())

    def setInfo(self, **values) -> None:
        """Set any of modelType, box, pixelSize, netBox, symmetry, gridOrder, nParticles, bestEpoch,
        valMedianErrorDeg (keyword arguments, same names as the constructor's)."""
        for key, value in values.items():
            attr = getattr(self, f"_{key}", None)
            if attr is None or key == "filename":
                raise ValueError(f"BayesposePoseNetwork has no attribute {key!r}")
            attr.set(value)

    def __str__(self) -> str:
        parts = [self.getModelType() or "?"]
        if self.getBox():
            parts.append(f"{self.getBox()} px")
        if self.getSamplingRate():
            parts.append(f"{self.getSamplingRate():.3f} Å/px")
        if self.getSymmetry():
            parts.append(self.getSymmetry())
        return f"{self.getClassName()} ({', '.join(parts)})"
