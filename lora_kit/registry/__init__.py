"""The adapter registry: named, versioned adapters with checksums and lineage (``store``),
and their way out to other servers and registries (``export``)."""

from lora_kit.adapters.format import InvalidAdapter
from lora_kit.registry.store import (
    KILL_HOOK_ENV,
    STORED_FILES,
    AdapterNotFound,
    AdapterVersion,
    InvalidName,
    InvalidReference,
    Registry,
    RegistryError,
    check_name,
    local_base_dir,
    sha256_file,
)

__all__ = [
    "KILL_HOOK_ENV",
    "STORED_FILES",
    "AdapterNotFound",
    "AdapterVersion",
    "InvalidAdapter",
    "InvalidName",
    "InvalidReference",
    "Registry",
    "RegistryError",
    "check_name",
    "local_base_dir",
    "sha256_file",
]
