"""crackio.storage.obstore_errors: every string it reads in obstore's errors, pinned with the texts obstore 0.12.1
gave against moto's S3 server, a FaultProxy and Python's http.server (bodies shortened), and with errors obtained
from obstore itself against a local server. An obstore whose wording changed fails here."""

from __future__ import annotations

import functools
import http.server
import threading
from datetime import timedelta

import obstore
import obstore.exceptions as oe
import pytest

from crackio.storage.obstore_errors import NO_BUCKET, NO_CONTAINER, NO_RANGES, already_exists, classify, status
from crackio.storage.remote import Missing, Remote, RemoteError

DEBUG = '\n\nDebug source:\nGeneric {\n    store: "S3",\n}'  # obstore appends its Rust error's Debug form
URL = "http://127.0.0.1:46387/crackio-bkt/p"
S3_404 = (
    f"Object at location p/nope not found: Error performing GET {URL}/nope in 56.505396ms - Server returned non-2xx "
    'status code: 404 Not Found: <?xml version="1.0" encoding="utf-8"?>\n<Error><Code>NoSuchKey</Code></Error>' + DEBUG
)
NO_SUCH_BUCKET = (
    "Object at location p/x not found: Error performing GET http://127.0.0.1:46387/no-such-bucket/p/x in 9.081679ms - "
    "Server returned non-2xx status code: 404 Not Found: <Error><Code>NoSuchBucket</Code></Error>" + DEBUG
)
DENIED = (
    f"The operation lacked the necessary privileges to complete for path p/x: Error performing GET {URL}/x in "
    "4.16683ms - Server returned non-2xx status code: 403 Forbidden: <Error><Code>Refused</Code></Error>" + DEBUG
)
UNAUTHENTICATED = (
    f"The operation lacked valid authentication credentials for path p/x: Error performing GET {URL}/x in "
    "1.903393ms - Server returned non-2xx status code: 401 Unauthorized: <Error><Code>Refused</Code></Error>" + DEBUG
)

# Azure's, as obstore 0.12.1 gave them against Azurite 3 (bodies shortened).
AZ = "http://127.0.0.1:10123/devstoreaccount1"
AZ_NO_CONTAINER = (
    f"Object at location pre/a not found: Error performing GET {AZ}/nocont/pre/a in 8.138246ms - Server returned "
    'non-2xx status code: 404 Not Found: <?xml version="1.0"?>\n<Error>\n  <Code>ContainerNotFound</Code>\n  '
    "<Message>The specified container does not exist.\n</Message>\n</Error>" + DEBUG
)
AZ_NO_BLOB = (
    f"Object at location pre/zz not found: Error performing GET {AZ}/cont/pre/zz in 5.880951ms - Server returned "
    'non-2xx status code: 404 Not Found: <?xml version="1.0"?>\n<Error>\n  <Code>BlobNotFound</Code>\n  '
    "<Message>The specified blob does not exist.\n</Message>\n</Error>" + DEBUG
)
AZ_BULK_MISSING = (
    "Object at location pre/zz not found: Bulk delete request failed for key pre/zz: The specified blob does not "
    'exist. (code: 404)\n\nDebug source:\nNotFound {\n    path: "pre/zz",\n}'
)
AZ_BULK_DENIED = "Bulk delete request failed for key pre/zz: This request is not authorized. (code: 403)"


def generic(code: str) -> str:
    return (
        f"Generic S3 error: Error performing GET {URL}/x in 3.766907ms - Server returned non-2xx status code: {code}: "
        "<Error><Code>SlowDown</Code></Error>" + DEBUG
    )


RESET = f"Generic S3 error: Error performing GET {URL}/x in 1.190475ms - HTTP error: error sending request" + DEBUG
REFUSED = f"Generic S3 error: Error performing GET {URL}/x in 286.906µs - HTTP error: error sending request" + DEBUG
NO_RANGE_TEXT = "Operation not supported: Range request not supported by f\n\nDebug source:\nNotSupported {}"
EXISTS = (
    "Object at location p/x already exists: Request precondition failure for path p/x: Error performing PUT "
    f"{URL}/x in 4.066671ms - Server returned non-2xx status code: 412 Precondition Failed: <Error/>" + DEBUG
)


@pytest.mark.parametrize(
    "error, transient, code, text, kind",
    [
        (FileNotFoundError(S3_404), False, 404, "404 not found", "missing"),
        (FileNotFoundError(NO_SUCH_BUCKET), False, 404, NO_BUCKET, "no-bucket"),
        (FileNotFoundError(AZ_NO_CONTAINER), False, 404, NO_CONTAINER, "no-bucket"),
        (FileNotFoundError(AZ_NO_BLOB), False, 404, "404 not found", "missing"),
        (FileNotFoundError(AZ_BULK_MISSING), False, 404, "404 not found", "missing"),
        (oe.GenericError(AZ_BULK_DENIED), False, 403, "403 access denied", "denied"),
        (oe.NotSupportedError(NO_RANGE_TEXT), False, None, NO_RANGES, "no-ranges"),
        (oe.PermissionDeniedError(DENIED), False, 403, "403 access denied", "denied"),
        (oe.UnauthenticatedError(UNAUTHENTICATED), False, 401, "401 not authenticated", "unauthenticated"),
        (oe.GenericError(generic("400 Bad Request")), False, 400, "HTTP 400", "status"),
        (oe.GenericError(generic("416 Range Not Satisfiable")), False, 416, "HTTP 416", "status"),
        (oe.GenericError(generic("503 Service Unavailable")), True, 503, "HTTP 503 (throttled)", "status"),
        (oe.GenericError(generic("429 Too Many Requests")), True, 429, "HTTP 429 (throttled)", "status"),
        (oe.GenericError(generic("500 Internal Server Error")), True, 500, "HTTP 500", "status"),
        (oe.GenericError(generic("408 Request Timeout")), True, 408, "HTTP 408", "status"),
        (oe.GenericError(RESET), True, None, "HTTP error: error sending request", "network"),
        (oe.GenericError(REFUSED), True, None, "HTTP error: error sending request", "network"),
        (oe.InvalidPathError("Encountered object with invalid path: a//b\n\nmore"), False, None, None, "invalid"),
    ],
)
def test_each_obstore_text_is_classified(error, transient, code, text, kind):
    failure = classify(error)
    assert (failure.transient, failure.status, failure.kind) == (transient, code, kind)
    assert failure.text == (text or "Encountered object with invalid path: a//b")
    assert "\n" not in failure.text and URL not in failure.text  # one line; the caller names the URL


def test_the_status_is_read_from_the_text():
    assert status(oe.GenericError(generic("503 Service Unavailable"))) == 503
    assert status(oe.GenericError("HTTP status: 429")) == 429
    assert status(oe.GenericError(RESET)) is None


@pytest.mark.parametrize(
    "error, exists",
    [
        (oe.AlreadyExistsError(EXISTS), True),
        (oe.GenericError(EXISTS.split(": ", 1)[1]), True),  # a store that says 412 only
        (oe.GenericError("Object at location p/x already exists"), True),
        (FileExistsError("p/x"), True),
        (oe.GenericError(generic("400 Bad Request")), False),
        (oe.PermissionDeniedError(DENIED), False),
    ],
)
def test_a_lost_conditional_put_is_recognised(error, exists):
    assert already_exists(error) is exists


@pytest.mark.parametrize(
    "error, kind, words, ending",
    [
        (
            FileNotFoundError(S3_404),
            Missing,
            "reading s3://bucket/pack/k failed: 404 not found: ",
            "--out s3://bucket/pack`",
        ),
        (FileNotFoundError(NO_SUCH_BUCKET), RemoteError, f"failed: {NO_BUCKET}", NO_BUCKET),
        (oe.NotSupportedError(NO_RANGE_TEXT), RemoteError, "reading s3://bucket/pack/k failed: ", NO_RANGES),
    ],
)
def test_the_fault_policy_raises_by_kind(error, kind, words, ending):
    """A missing object is `Missing` (open_pack tells "no pack here" by it); the fix follows the text, except
    where the text says it."""

    def request():
        raise error

    with pytest.raises(RemoteError) as raised:
        Remote("s3://bucket/pack", timeout=1).call("k", "reading", request)
    assert type(raised.value) is kind
    assert words in str(raised.value) and str(raised.value).endswith(ending)


@pytest.fixture
def served(tmp_path):
    """Python's http.server over a folder: it answers a Range request with the whole file (no ranges)."""
    (tmp_path / "f").write_bytes(b"0123456789")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_errors_obstore_raises_are_classified(served):
    from obstore.store import HTTPStore

    retry = {"max_retries": 0, "retry_timeout": timedelta(seconds=5)}
    store = HTTPStore.from_url(served, client_options={"allow_http": True}, retry_config=retry)  # type: ignore[arg-type]
    with pytest.raises(Exception) as missing:
        obstore.get(store, "nope")
    assert classify(missing.value).kind == "missing"
    with pytest.raises(Exception) as ranged:
        obstore.get(store, "f", options={"range": (0, 3)})
    assert classify(ranged.value).kind == "no-ranges"
