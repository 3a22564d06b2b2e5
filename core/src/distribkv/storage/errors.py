"""The one error hierarchy of the storage layer.

Every backend translates its library's exceptions into these classes, so nothing native
(``plyvel.Error``, ``lmdb.Error``, rocksdict's bare ``Exception``) ever reaches the core.
"""


class StorageError(Exception):
    """Base class of every storage failure."""


class BackendClosedError(StorageError):
    """The backend was closed; every use after ``close()`` raises this."""


class BackendLockedError(StorageError):
    """The data directory is already open, in this process or another one."""


class BackendUnavailableError(StorageError):
    """The backend's native library could not be loaded."""


class StorageFullError(StorageError):
    """No space left: the disk, the file system or the engine's map is full."""


class CorruptionError(StorageError):
    """Stored data failed a checksum or the engine found its files damaged."""


class InvalidKeyError(StorageError, ValueError):
    """A key is empty, too long or not bytes."""


class InvalidValueError(StorageError, ValueError):
    """A value is not bytes or exceeds the configured limit."""


class UnsupportedOperationError(StorageError):
    """The backend does not declare the capability the operation needs."""


class InvalidSettingError(StorageError, ValueError):
    """A backend setting is unknown or has a bad value."""


# How LevelDB and RocksDB word "another handle holds this directory's LOCK file".
_LOCK_SIGNS = ("already held", "lock hold", "no locks available", "temporarily unavailable")


def from_status(message: str, context: str) -> StorageError:
    """Translate a LevelDB/RocksDB status string ("IO error: ...", "Corruption: ...").

    Both engines report failures as text; this maps the text onto the hierarchy above.
    ``context`` says what was being done (and where), for the message.
    """
    text = f"{context}: {message}"
    lowered = message.lower()
    if "no space left" in lowered or "disk quota" in lowered:
        return StorageFullError(text)
    if "corruption" in lowered or "checksum" in lowered:
        return CorruptionError(text)
    if "lock" in lowered and any(sign in lowered for sign in _LOCK_SIGNS):
        return BackendLockedError(f"{context}: the data directory is already open ({message})")
    return StorageError(text)
