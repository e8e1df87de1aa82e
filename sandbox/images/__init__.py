"""The images layer: references, the registry client, the store, and ImageService over
them (pull, resolve, list, inspect, tag, remove, import, push, gc; per tenant)."""

from sandbox.images.digests import is_digest
from sandbox.images.imageconfig import apply_run
from sandbox.images.manifest import Platform, platform_serves
from sandbox.images.public import PUBLIC, PublicNames
from sandbox.images.registry.config import RegistriesConfig
from sandbox.images.service import (
    Image,
    ImageService,
    ImageSummary,
    ProgressCallback,
    PullProgress,
)
from sandbox.images.store.unpack import Ownership

__all__ = [
    "PUBLIC",
    "Image",
    "ImageService",
    "ImageSummary",
    "Ownership",
    "Platform",
    "ProgressCallback",
    "PublicNames",
    "PullProgress",
    "RegistriesConfig",
    "apply_run",
    "is_digest",
    "platform_serves",
]
