"""Registry client: pull and push images over the OCI distribution API."""

from sandbox.images.registry.client import (
    MANIFEST_ACCEPT,
    FetchedManifest,
    ManifestHead,
    RegistryClient,
    RetryPolicy,
)
from sandbox.images.registry.config import ConfigError, RegistriesConfig, RegistryConfig

__all__ = ["MANIFEST_ACCEPT", "ConfigError", "FetchedManifest", "ManifestHead",
           "RegistriesConfig", "RegistryClient", "RegistryConfig", "RetryPolicy"]
