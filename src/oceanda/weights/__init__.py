"""Trained weights shipped with oceanda (package data, in the wheel).

``gulfstream_4nadirs.pt``: a small 4DVarNet (bilinear auto-encoder prior, ConvLSTM solver)
trained by ``oceanda train`` on a year of the Gulf Stream quasi-geostrophic OSSE with the
four nadir altimeters of the 2020a data challenge, the challenge's evaluation period
(2012-10-22..2012-12-02) held out. It is OI-initialised (``model.init="oi"``): the
method computes each patch's OI analysis and the trained solver corrects it. How it was
trained (the exact commands) and what it scores: ``README.md`` in this folder.

``gyre_4nadirs.pt`` (the default): the same architecture trained on the Gulf Stream double-gyre
truth (``truth=gyre``): another seed's year for training, a held-out seed's year for validation
(selection by its validation RMSE, the untrained OI start included), the test seed's
evaluation window never seen. ``README.md`` in this folder: commands, learning curve, scores.

``method=4dvarnet`` with ``method.checkpoint=null`` (the default of
``configs/method/4dvarnet.yaml``) uses :func:`default_checkpoint`; ``shipped:gulfstream_4nadirs``
selects the QG-trained weights.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from oceanda.errors import ConfigError, InputError

__all__ = ["SHIPPED", "DEFAULT", "shipped_checkpoint", "default_checkpoint", "resolve_checkpoint"]

#: name -> file of every shipped checkpoint (in this package)
SHIPPED: dict[str, str] = {"gulfstream_4nadirs": "gulfstream_4nadirs.pt", "gyre_4nadirs": "gyre_4nadirs.pt"}
#: name -> BLAKE2b-128 digest of the file's bytes (:func:`oceanda.data.integrity.file_digest`),
#: checked whenever a shipped checkpoint is used; update it with the file
SHIPPED_DIGESTS: dict[str, str] = {"gulfstream_4nadirs": "7a02b65a7dca2264d2ad9f35d7dfae90",
                                   "gyre_4nadirs": "dd76499f1b9dc910dd17a21cfd11953b"}
#: the checkpoint ``method=4dvarnet`` uses when none is given (the demo's truth is ``gyre``)
DEFAULT = "gyre_4nadirs"


def shipped_checkpoint(name: str = DEFAULT) -> Path:
    """Path of the shipped checkpoint ``name`` (a key of :data:`SHIPPED`).

    Raises ConfigError for an unknown name, InputError when the file is missing from the
    installation or its bytes differ from :data:`SHIPPED_DIGESTS` (a broken install:
    reinstall oceanda).
    """
    if name not in SHIPPED:
        raise ConfigError(f"shipped weights {name!r}: unknown; one of {', '.join(sorted(SHIPPED))}")
    path = Path(str(resources.files(__name__).joinpath(SHIPPED[name])))
    if not path.is_file():
        raise InputError(f"shipped weights {name!r}: {path} is missing from the installation "
                         "(reinstall oceanda)")
    from oceanda.data.integrity import file_digest

    if file_digest(path) != SHIPPED_DIGESTS[name]:
        raise InputError(f"shipped weights {name!r}: {path} is damaged (its digest differs from the "
                         "one it was shipped with): reinstall oceanda")
    return path


def default_checkpoint() -> Path:
    """Path of the checkpoint ``method=4dvarnet`` uses by default (:data:`DEFAULT`)."""
    return shipped_checkpoint(DEFAULT)


def resolve_checkpoint(checkpoint: str | None) -> str:
    """``checkpoint`` as given, ``None`` / ``"default"`` -> the default shipped weights,
    ``"shipped:NAME"`` -> the shipped checkpoint ``NAME``."""
    if checkpoint is None or str(checkpoint) in ("", "default", "null", "None"):
        return str(default_checkpoint())
    s = str(checkpoint)
    if s.startswith("shipped:"):
        return str(shipped_checkpoint(s.split(":", 1)[1]))
    return s
