"""`python -m service.prepare` (make prepare, make serve): every backbone the server will
load (GRAFT_BACKBONES) exported in every variant, and split where it fine-tunes, so that
neither serving nor a download waits for it."""

from __future__ import annotations

import logging

from models.export import ensure_split, ensure_variant
from models.quantize import VARIANTS
from service.settings import Settings


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = Settings()
    for spec in settings.loaded_backbones():
        for variant in VARIANTS:
            print(f"{spec.id} {variant}: {ensure_variant(spec, settings.backbone_dir, variant)}")
        if (split := ensure_split(spec, settings.backbone_dir)) is not None:
            print(f"{spec.id} trunk and top: {split[0]}, {split[1]}")


if __name__ == "__main__":
    main()
