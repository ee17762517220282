"""gRPC test kit: a test .proto with google.api.http rules, compiled at test time with
grpc_tools.protoc (Python modules and a descriptor set), and a grpcio server implementing it.

`compiled(tmp_dir)` returns the generated modules and the descriptor set's path; `GrpcOrigin`
runs the Bookstore service on 127.0.0.1 (h2c, as grpcio serves without TLS) and records what
it saw: metadata, cancellations, how far a slow client let a stream get.
"""

from __future__ import annotations

import importlib
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

PROTO = """
syntax = "proto3";
package bookstore.v1;

import "google/api/annotations.proto";

message Book {
  int64 id = 1;
  string title = 2;
  string author = 3;
  repeated string tags = 4;
  bool hardcover = 5;
}
message GetBookRequest { string shelf = 1; int64 book_id = 2; bool verbose = 3; }
message CreateBookRequest { string shelf = 1; Book book = 2; }
message ListBooksRequest { string shelf = 1; int32 page_size = 2; repeated string tags = 3; }
message ListBooksResponse { repeated Book books = 1; string shelf = 2; }
message Chunk { bytes data = 1; int32 index = 2; }
message StreamRequest { int32 count = 1; int32 size = 2; }
message EchoRequest {
  string text = 1;
  int32 fail_code = 2;
  string fail_message = 3;
  int32 sleep_ms = 4;
  bytes blob = 5;
}
message EchoResponse { string text = 1; bytes blob = 2; map<string, string> metadata = 3; int32 count = 4; }

service Bookstore {
  rpc GetBook(GetBookRequest) returns (Book) {
    option (google.api.http) = { get: "/v1/shelves/{shelf}/books/{book_id}" };
  }
  rpc CreateBook(CreateBookRequest) returns (Book) {
    option (google.api.http) = { post: "/v1/shelves/{shelf}/books" body: "book" };
  }
  rpc ListBooks(ListBooksRequest) returns (ListBooksResponse) {
    option (google.api.http) = {
      get: "/v1/{shelf=shelves/*}/books"
      additional_bindings { get: "/v1/books" response_body: "books" }
    };
  }
  rpc Echo(EchoRequest) returns (EchoResponse) {
    option (google.api.http) = { post: "/v1/echo" body: "*" };
  }
  rpc Stream(StreamRequest) returns (stream Chunk) {
    option (google.api.http) = { get: "/v1/stream" };
  }
  rpc Upload(stream Chunk) returns (EchoResponse);
  rpc Chat(stream EchoRequest) returns (stream EchoResponse);
}
"""


@dataclass
class Compiled:
    pb2: Any
    pb2_grpc: Any
    descriptor: Path


_CACHE: dict[Path, Compiled] = {}


def compiled(directory: Path) -> Compiled:
    """Compile PROTO into `directory` (once per directory) and import the modules."""
    if directory in _CACHE:
        return _CACHE[directory]
    import google.api
    import grpc_tools
    from grpc_tools import protoc

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bookstore.proto").write_text(PROTO)
    googleapis = Path(google.api.__path__[0]).parent.parent  # the dir holding google/api/*.proto
    bundled = Path(grpc_tools.__file__).parent / "_proto"
    descriptor = directory / "bookstore.pb"
    args = [
        "protoc",
        f"-I{directory}",
        f"-I{googleapis}",
        f"-I{bundled}",
        f"--python_out={directory}",
        f"--grpc_python_out={directory}",
        f"--descriptor_set_out={descriptor}",
        "--include_imports",
        str(directory / "bookstore.proto"),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    sys.path.insert(0, str(directory))
    try:
        pb2 = importlib.import_module("bookstore_pb2")
        pb2_grpc = importlib.import_module("bookstore_pb2_grpc")
    finally:
        sys.path.remove(str(directory))
    result = _CACHE[directory] = Compiled(pb2, pb2_grpc, descriptor)
    return result


def descriptor_set(directory: Path, name: str, proto: str) -> Path:
    """Only a descriptor set (with imports) for `proto`, written to `directory/name.pb`."""
    import google.api
    import grpc_tools
    from grpc_tools import protoc

    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.proto").write_text(proto)
    googleapis = Path(google.api.__path__[0]).parent.parent
    bundled = Path(grpc_tools.__file__).parent / "_proto"
    out = directory / f"{name}.pb"
    args = ["protoc", f"-I{directory}", f"-I{googleapis}", f"-I{bundled}", f"--descriptor_set_out={out}"]
    if protoc.main([*args, "--include_imports", str(directory / f"{name}.proto")]) != 0:
        raise RuntimeError("protoc failed")
    return out


class GrpcOrigin:
    """The Bookstore service on a grpcio server (h2c on 127.0.0.1)."""

    def __init__(self, kit: Compiled, workers: int = 8) -> None:
        self.kit = kit
        self.metadata: list[dict[str, str]] = []
        self.remaining: list[float | None] = []  # each call's deadline as the server saw it
        self.cancelled = threading.Event()
        self.sent = 0  # messages a stream has handed to grpcio so far
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers),
            options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)],
        )
        kit.pb2_grpc.add_BookstoreServicer_to_server(_Servicer(self), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0).wait(5)


class _Servicer:
    def __init__(self, origin: GrpcOrigin) -> None:
        self.origin = origin
        self.pb2 = origin.kit.pb2

    def _record(self, context: Any) -> None:
        self.origin.metadata.append({key: str(value) for key, value in context.invocation_metadata()})
        self.origin.remaining.append(context.time_remaining())

    def GetBook(self, request: Any, context: Any) -> Any:
        self._record(context)
        if request.book_id == 404:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no book {request.book_id} on {request.shelf}")
        return self.pb2.Book(id=request.book_id, title=f"{request.shelf}:{request.book_id}", hardcover=request.verbose)

    def CreateBook(self, request: Any, context: Any) -> Any:
        self._record(context)
        if not request.book.title:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a book needs a title")
        book = self.pb2.Book()
        book.CopyFrom(request.book)
        book.id = 7
        book.author = book.author or request.shelf
        return book

    def ListBooks(self, request: Any, context: Any) -> Any:
        self._record(context)
        books = [self.pb2.Book(id=i, title=f"t{i}", tags=list(request.tags)) for i in range(request.page_size)]
        return self.pb2.ListBooksResponse(books=books, shelf=request.shelf)

    def Echo(self, request: Any, context: Any) -> Any:
        self._record(context)
        if request.sleep_ms:
            deadline = time.monotonic() + request.sleep_ms / 1000
            while time.monotonic() < deadline:
                if not context.is_active():
                    self.origin.cancelled.set()
                    return self.pb2.EchoResponse()
                time.sleep(0.01)
        if request.fail_code:
            context.set_trailing_metadata((("x-detail", "trailing"),))
            context.abort(_code(request.fail_code), request.fail_message)
        context.set_trailing_metadata((("x-trailer", "t-value"),))
        metadata = dict(self.origin.metadata[-1])
        return self.pb2.EchoResponse(text=request.text, blob=request.blob, metadata=metadata)

    def Stream(self, request: Any, context: Any) -> Iterator[Any]:
        self._record(context)
        payload = b"x" * request.size
        finished = threading.Event()
        # grpcio stops pulling a cancelled stream's generator: the callback is what notices.
        context.add_callback(lambda: None if finished.is_set() else self.origin.cancelled.set())
        for index in range(request.count):
            if not context.is_active():
                self.origin.cancelled.set()
                return
            self.origin.sent = index + 1
            if index == request.count - 1:
                finished.set()
            yield self.pb2.Chunk(data=payload, index=index)

    def Upload(self, requests: Iterator[Any], context: Any) -> Any:
        self._record(context)
        total = 0
        count = 0
        for chunk in requests:
            total += len(chunk.data)
            count += 1
        return self.pb2.EchoResponse(text=str(total), count=count)

    def Chat(self, requests: Iterator[Any], context: Any) -> Iterator[Any]:
        self._record(context)
        for index, message in enumerate(requests):
            yield self.pb2.EchoResponse(text=message.text.upper(), count=index)


def _code(number: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    raise ValueError(number)
