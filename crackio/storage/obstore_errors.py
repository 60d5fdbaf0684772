"""obstore's exceptions as the fault policy reads them: the one place in crackio that looks at their text.

obstore (0.12) raises a few typed exceptions (FileNotFoundError, PermissionDeniedError, ...) and a `GenericError`
for the rest, whose text carries the HTTP status ("... Server returned non-2xx status code: 503 Service
Unavailable: ..."). Every string read here is pinned by tests/test_library_obstore_errors.py, so an obstore whose
wording changed fails there, not in a user's run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NO_RANGES = "the server does not answer Range requests: serve the folder with one that does (nginx, Apache, S3)"
NO_BUCKET = "404 no such bucket (check its name, and AWS_ENDPOINT_URL for a store other than AWS)"
NO_CONTAINER = "404 no such container (check its name and AZURE_STORAGE_ACCOUNT_NAME; crackio creates none)"
# obstore deletes through S3's DeleteObjects, which answers 200 OK with an <Error> for each key it refused (a key
# the policy denies is "AccessDenied" there, not a 403): "DeleteObjects request failed for key p/x: Access Denied
# (code: AccessDenied)"; and through Azure's blob batch, whose refusals carry the status: "Bulk delete request
# failed for key p/x: The specified blob does not exist. (code: 404)".
DELETE_FAILED = re.compile(
    r"(?:DeleteObjects|Bulk delete) request failed for key \S+: (?P<message>.*?) \(code: (?P<code>\w+)\)"
)
DENIED_CODES = ("AccessDenied", "AllAccessDisabled", "403", "AuthorizationPermissionMismatch")
MISSING_CODES = ("404", "NoSuchKey", "BlobNotFound")
# Azure answers a missing container with a 404 whose body names it (every request under it fails so).
NO_CONTAINER_TEXT = ("ContainerNotFound", "The specified container does not exist")


@dataclass(frozen=True)
class Failure:
    """What an obstore error means: `transient` (worth retrying), the HTTP `status` when known (404 for a missing
    object or bucket), one line of `text` without the URL (the caller names it), and `kind`: "missing" (no such
    object), "no-bucket", "no-ranges", "denied", "unauthenticated", "invalid" (a path or operation obstore
    refuses), "status" (another HTTP status) or "network" (refused, reset, timed out, a broken body)."""

    transient: bool
    status: int | None
    text: str
    kind: str


def status(error: BaseException) -> int | None:
    """The HTTP status in an obstore error's text ("... non-2xx status code: 503 Service Unavailable ...")."""
    found = re.search(r"status(?: code)?:? (\d{3})\b", str(error))
    return int(found.group(1)) if found else None


def classify(error: BaseException) -> Failure:
    """An error raised by obstore, classified: transient for the network's failures, 5xx, 408 and 429; permanent
    for the rest (4xx, a server without Range requests, a malformed path, an unsupported operation). A key that
    S3's DeleteObjects refused is read from its error code: AccessDenied is a 403, InternalError and SlowDown are
    transient, any other code is permanent."""
    import obstore.exceptions as oe

    code = status(error)
    text = str(error)
    if "NoSuchBucket" in text:  # S3's (and GCS's XML API's) error code in the 404's body
        return Failure(False, 404, NO_BUCKET, "no-bucket")
    if any(t in text for t in NO_CONTAINER_TEXT):
        return Failure(False, 404, NO_CONTAINER, "no-bucket")
    refused = DELETE_FAILED.search(text)
    if refused:  # S3 answers a delete (DeleteObjects) 200 OK with an error per key: a denied DELETE comes this way
        key_code, message = refused.group("code"), refused.group("message")
        if key_code in DENIED_CODES:
            return Failure(False, 403, "403 access denied", "denied")
        if key_code in MISSING_CODES:
            return Failure(False, 404, "404 not found", "missing")
        transient = key_code in ("InternalError", "ServiceUnavailable", "SlowDown")
        return Failure(transient, None, f"{message[:120]} ({key_code})", "network" if transient else "status")
    if isinstance(error, FileNotFoundError | oe.NotFoundError):
        return Failure(False, 404, "404 not found", "missing")
    if "range request not supported" in text.lower():  # HTTPStore's RangeNotSupported
        return Failure(False, None, NO_RANGES, "no-ranges")
    if isinstance(error, oe.InvalidPathError | oe.NotSupportedError | oe.UnknownConfigurationKeyError):
        return Failure(False, code, text.splitlines()[0][:200] if text else type(error).__name__, "invalid")
    if isinstance(error, oe.PermissionDeniedError):
        return Failure(False, code or 403, f"{code or 403} access denied", "denied")
    if isinstance(error, oe.UnauthenticatedError):
        return Failure(False, code or 401, f"{code or 401} not authenticated", "unauthenticated")
    if code is not None:
        transient = code >= 500 or code in (408, 429)
        return Failure(transient, code, f"HTTP {code}" + (" (throttled)" if code in (429, 503) else ""), "status")
    line = text.splitlines()[0] if text else type(error).__name__
    line = re.sub(r"^Generic \w+ error: ", "", line)
    line = re.sub(r"Error performing \w+ \S+ in [\d.]+\w+ - ", "", line)  # the URL is named by the caller
    return Failure(True, None, line[:160], "network")


def already_exists(error: BaseException) -> bool:
    """Whether a conditional PUT (If-None-Match: *) lost to an existing object: obstore's AlreadyExistsError, or
    a store's 412 Precondition Failed told only in the text."""
    import obstore.exceptions as oe

    if isinstance(error, FileExistsError | oe.AlreadyExistsError):
        return True
    return "already exists" in str(error).lower() or status(error) == 412
