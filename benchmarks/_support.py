"""The tests' shared helpers (tests/support/: ResNet-18 shapes, S3 on loopback) for the
benchmarks, which run as scripts: puts the repository root on sys.path first."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import LoopbackS3, resnet18_cifar_shapes  # noqa: E402

__all__ = ["LoopbackS3", "resnet18_cifar_shapes"]
