"""One image of a VI-ReID dataset, as every reader, the shard writer and the protocols see it."""
from __future__ import annotations

from dataclasses import asdict, dataclass

INFRARED = 0  # modality index: selects the infrared prompt library
VISIBLE = 1  # modality index: selects the visible prompt library
MODALITY_NAMES = {INFRARED: "infrared", VISIBLE: "visible"}


@dataclass(frozen=True)
class Record:
    """path: absolute image path; pid: the dataset's own identity id; camera: the dataset's own
    1-based camera number (SYSU cam1..cam6, LLCM cam1..cam9, RegDB 1 = visible, 2 = thermal);
    modality: INFRARED or VISIBLE; split: "train" or "test"."""

    path: str
    pid: int
    camera: int
    modality: int
    split: str

    def to_json(self) -> dict:
        """Plain dict for index.json and shard metadata."""
        return asdict(self)
