"""Remote stores (s3://, gs://, az://, ...): what goes wrong there is this machine's setup, said in one line.

fsspec hands a URL to a backend package (s3fs, gcsfs, adlfs) that may not be installed, and the backend to
a cloud SDK that may find no credentials or no endpoint. Those are the user's to fix, like a mistyped path,
so they get one `error:` line instead of a traceback from deep inside botocore.
"""
from __future__ import annotations

from types import TracebackType

from fsspec.core import url_to_fs

from tierprune.errors import TierpruneError

# Cloud SDKs and fsspec backends whose own exceptions describe credentials, permissions or endpoints.
_BACKEND_PACKAGES = ("botocore", "aiobotocore", "boto3", "s3fs", "gcsfs", "google.auth", "google.api_core",
                     "google.cloud", "adlfs", "azure")


def _raised_in_fsspec(tb: TracebackType | None) -> bool:
    while tb is not None:
        if "/fsspec/" in tb.tb_frame.f_code.co_filename.replace("\\", "/"):
            return True
        tb = tb.tb_next
    return False


def environment_error(exc: BaseException) -> str | None:
    """One line for an exception about this machine's store setup (a missing backend, credentials, an
    endpoint), or None for anything else, which stays a traceback (it is a bug to report)."""
    if isinstance(exc, ImportError) and _raised_in_fsspec(exc.__traceback__):
        return f"a store URL needs a package that is not installed: {exc}"  # fsspec names it: "install gcsfs"
    module = type(exc).__module__ or ""
    if any(module == p or module.startswith(p + ".") for p in _BACKEND_PACKAGES):
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
        return f"the store could not be reached: {type(exc).__name__}: {message}"
    return None


def probe(uri: str, label: str) -> None:
    """Touch a remote location once (backend installed, credentials found, endpoint answering) before the
    work whose result it is to receive: a missing s3fs should not cost an hour of pruning.

    A setup problem is a TierpruneError `{label}: {cause}`; anything else propagates as it is.
    """
    try:
        fs, path = url_to_fs(uri)
        fs.exists(path)
    except Exception as exc:
        line = environment_error(exc)
        if line is None:
            raise
        raise TierpruneError(f"{label}: {line}") from None
