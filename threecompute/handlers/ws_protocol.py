"""Tornado's WebSocket protocol, with the close frames a refused message is owed.

Two cases where stock Tornado 6.6 tears the TCP connection down without a close the client
can read:

- **A message over the size limit (1009).** Tornado writes the close frame, then closes the
  socket at once. The rest of the oversized message is still arriving, and closing a socket
  with unread data makes the kernel send a reset, which destroys the close frame on its way
  (a 2 MiB message: reset every time). Here the size is checked as soon as a frame's length
  has been read, before Tornado does: the close frame is sent, the frame's payload is read
  and thrown away, and the connection carries on with the closing handshake (the client's
  close frame, or Tornado's 5-second closing timeout), so nothing is left unread to provoke
  a reset.
- **Invalid UTF-8 in a text frame (1007).** Tornado drops the connection with no close
  frame. Here the frame is refused with 1007 and the closing handshake runs as usual.

Nothing is delivered to the handler once the server has sent its close frame.

`write_text` sends a text frame and returns the stream's own future for it: Tornado's
`write_message` wraps that future in a coroutine and a task per frame, which a terminal
streaming output pays for on every frame.

What this relies on in Tornado (pinned in requirements.txt; covered by
tests/test_ws_close.py): `WebSocketHandler.get_websocket_protocol`; in `WebSocketProtocol13`,
`params`, `stream`, `server_terminated`/`client_terminated`, `_write_frame` returning the
stream's write future, `_receive_frame` reading each
frame's header through `_read_bytes` (2 bytes, then 2 or 8 of extended length), the
fragment state `_fragmented_message_buffer`/`_fragmented_message_opcode`, `_handle_message`,
and for compressed messages `_frame_compressed`, `_decompressor` and `_DecompressTooLargeError`.
"""

from __future__ import annotations

import struct
from asyncio import Future

import tornado.websocket
from tornado.httputil import HTTPHeaders
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClosedError, WebSocketProtocol13, _DecompressTooLargeError

MESSAGE_TOO_BIG = 1009
INVALID_PAYLOAD = 1007
TEXT, BINARY = 0x1, 0x2
FIN, MASKED, CONTROL = 0x80, 0x80, 0x8
DISCARD_CHUNK = 64 * 1024


class _Oversized(Exception):
    """Raised out of Tornado's frame parser: `size` bytes of this frame remain to be read."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def frame_length(header: bytes) -> int | None:
    """The payload length once `header` holds enough of a frame's start; None before."""
    if len(header) < 2:
        return None
    short = header[1] & 0x7F
    if short < 126:
        return short
    if short == 126:
        return struct.unpack("!H", header[2:4])[0] if len(header) >= 4 else None
    return struct.unpack("!Q", header[2:10])[0] if len(header) >= 10 else None


class ClosingProtocol(WebSocketProtocol13):
    __slots__ = ("_header",)  # kept out of the instance dict, which Tornado's keys fill to the sharing limit

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._header: bytes | None = None  # the current frame's first bytes, until its length is known

    def write_text(self, text: str) -> Future[None]:
        """One text frame; the future is the stream's (it fails with StreamClosedError if the
        connection drops before the frame is written). Raises WebSocketClosedError once closing."""
        if self.is_closing():
            raise WebSocketClosedError()
        # Uncompressed even if permessage-deflate were negotiated: RFC 7692 lets each message
        # say (RSV1) whether it is compressed.
        payload = text.encode("utf-8")
        self._message_bytes_out += len(payload)
        try:
            return self._write_frame(True, TEXT, payload)
        except StreamClosedError as exc:
            raise WebSocketClosedError() from exc

    async def _receive_frame(self) -> None:
        self._header = b""
        try:
            await super()._receive_frame()
        except _Oversized as oversized:
            await self._discard(oversized.size)
        finally:
            self._header = None

    async def _read_bytes(self, n: int) -> bytes:
        data = await super()._read_bytes(n)
        if self._header is not None:
            self._header += data
            length = frame_length(self._header)
            if length is not None:
                header, self._header = self._header, None
                self._check_size(header, length)
        return data

    def _check_size(self, header: bytes, length: int) -> None:
        """Tornado's own size rule, applied first, so that it never aborts the connection."""
        opcode = header[0] & 0x0F
        if opcode & CONTROL:
            return
        buffered = self._fragmented_message_buffer
        if length + (len(buffered) if buffered is not None else 0) <= self.params.max_message_size:
            return
        self.close(MESSAGE_TOO_BIG, "message too big")  # once; later ones send nothing
        if header[0] & FIN:
            self._fragmented_message_buffer = None
        else:  # more fragments follow: they are taken, counted and dropped like the rest
            self._fragmented_message_buffer = bytearray()
            if opcode:
                self._fragmented_message_opcode = opcode
        raise _Oversized(length + (4 if header[1] & MASKED else 0))

    async def _discard(self, size: int) -> None:
        while size > 0:
            size -= len(await self.stream.read_bytes(min(size, DISCARD_CHUNK), partial=True))

    def _handle_message(self, opcode: int, data: bytes):  # noqa: ANN201 - Tornado's signature
        if opcode in (TEXT, BINARY) and self.server_terminated:
            return None  # the server has said goodbye: nothing more reaches the handler
        if opcode in (TEXT, BINARY) and self._frame_compressed:
            try:
                data = self._decompressor.decompress(data)
            except _DecompressTooLargeError:
                self.close(MESSAGE_TOO_BIG, "message too big after decompression")
                return None  # the frame was read whole: the closing handshake goes on
            self._frame_compressed = False  # decompressed: Tornado must not do it again
        if opcode == TEXT:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                self.close(INVALID_PAYLOAD, "text frame is not valid UTF-8")
                return None
        return super()._handle_message(opcode, data)


class ClosingWebSocketHandler(tornado.websocket.WebSocketHandler):
    """A WebSocketHandler speaking `ClosingProtocol` (a mixin base for this server's sockets)."""

    def forget_handshake(self) -> None:
        """Let go of what only the upgrade needed: the request's headers, its parsed cookies
        and the 101's response headers. A terminal socket lives for hours, and these are
        about 4 KiB of every one (the request line and the peer's address stay). Emptied in
        place: Tornado's HTTP reader, suspended for the socket's life, holds the same object."""
        for headers in (self.request.headers, self._headers):
            HTTPHeaders.__init__(headers)
        self.request.__dict__.pop("_cookies", None)

    def write_text(self, text: str) -> Future[None]:
        """`write_message` for a text frame, without Tornado's task per frame (see the module's
        docstring). Raises WebSocketClosedError if the socket is closed or closing."""
        connection = self.ws_connection
        if not isinstance(connection, ClosingProtocol):  # None: closed (the only other protocol)
            raise WebSocketClosedError()
        return connection.write_text(text)

    def get_websocket_protocol(self) -> WebSocketProtocol13 | None:
        stock = super().get_websocket_protocol()
        if not isinstance(stock, WebSocketProtocol13):
            return stock
        return ClosingProtocol(self, False, stock.params)
