"""The moto S3 server over HTTP, for every s3:// test: boto3 and pyarrow (Ray Train's checkpoint
writer) reach it at AWS_ENDPOINT_URL exactly as they would reach MinIO or Ceph in a hospital."""
from __future__ import annotations

import contextlib
import threading


def s3_compliant(app):
    """moto 5 names CompleteMultipartUpload's XML root `...Response` where S3 (and MinIO) say
    `...Result`; pyarrow's S3 client then reports every multipart upload as failed. This WSGI
    wrapper renames that root; nothing else changes."""
    def wrapped(environ, start_response):
        captured = []
        body = b"".join(app(environ, lambda status, headers, exc_info=None: captured.append((status, headers))))
        status, headers = captured[0]
        if b"<CompleteMultipartUploadResponse" in body:
            body = body.replace(b"CompleteMultipartUploadResponse", b"CompleteMultipartUploadResult")
            headers = [(k, str(len(body)) if k.lower() == "content-length" else v) for k, v in headers]
        start_response(status, headers)
        return [body]

    return wrapped


@contextlib.contextmanager
def moto_s3_server(port: int):
    """Yields the endpoint URL of a moto server on 127.0.0.1:port, in a thread of this process."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", port, s3_compliant(DomainDispatcherApplication(create_backend_app)), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        thread.join()
