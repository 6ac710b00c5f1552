"""Tornado's WebSocket protocol, with the close frames a refused message is owed.

Two cases where stock Tornado 6.6 tears the TCP connection down without a close the client
can read:

- **A message over the size limit (1009).** Tornado writes the close frame, then closes the
  socket at once. The rest of the oversized message is still arriving, and closing a socket
  with unread data makes the kernel send a reset, which destroys the close frame on its way
  (a 2 MiB message: reset every time). Here the connection is kept open after the close
  frame and whatever the client still sends is read and thrown away, until the client closes
  or Tornado's own 5-second closing timeout ends it; by then nothing unread is left to
  provoke a reset.
- **Invalid UTF-8 in a text frame (1007).** Tornado drops the connection with no close
  frame. Here the frame is refused with 1007 and the closing handshake runs as usual.

Nothing is delivered to the handler once the server has sent its close frame.

What this relies on in Tornado (pinned in requirements.txt; covered by
tests/test_ws_close.py): `WebSocketHandler.get_websocket_protocol`, `WebSocketProtocol13`'s
`params`, `stream`, `server_terminated`/`client_terminated`, `_receive_frame`,
`_handle_message`, `_abort`, and, for compressed messages, `_frame_compressed`,
`_decompressor` and `_DecompressTooLargeError`.
"""

from __future__ import annotations

import tornado.websocket
from tornado.websocket import WebSocketProtocol13, _DecompressTooLargeError

MESSAGE_TOO_BIG = 1009
INVALID_PAYLOAD = 1007
TEXT, BINARY = 0x1, 0x2
DRAIN_CHUNK = 64 * 1024


class ClosingProtocol(WebSocketProtocol13):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._drain_next_abort = False
        self._draining = False

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        if code == MESSAGE_TOO_BIG and not self.server_terminated and not self.client_terminated:
            # Tornado aborts right after this close; that abort becomes a drain.
            self._drain_next_abort = True
        super().close(code, reason)

    def _abort(self) -> None:
        if self._drain_next_abort:
            self._drain_next_abort = False
            self._draining = True
            return
        super()._abort()

    async def _receive_frame(self) -> None:
        await super()._receive_frame()
        if self._draining:
            await self._drain()

    async def _drain(self) -> None:
        """Read and drop bytes until the stream closes (the client, or the closing timeout).

        Raises StreamClosedError, which ends Tornado's frame loop as any closed stream does.
        """
        while True:
            await self.stream.read_bytes(DRAIN_CHUNK, partial=True)

    def _handle_message(self, opcode: int, data: bytes):  # noqa: ANN201 - Tornado's signature
        if opcode in (TEXT, BINARY) and self.server_terminated:
            return None  # the server has said goodbye: nothing more reaches the handler
        if opcode == TEXT and not self.client_terminated:
            if self._frame_compressed:
                try:
                    data = self._decompressor.decompress(data)
                except _DecompressTooLargeError:
                    self.close(MESSAGE_TOO_BIG, "message too big after decompression")
                    self._abort()
                    return None
                self._frame_compressed = False  # decompressed: Tornado must not do it again
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                self.close(INVALID_PAYLOAD, "text frame is not valid UTF-8")
                return None
        return super()._handle_message(opcode, data)


class ClosingWebSocketHandler(tornado.websocket.WebSocketHandler):
    """A WebSocketHandler speaking `ClosingProtocol` (a mixin base for this server's sockets)."""

    def get_websocket_protocol(self) -> WebSocketProtocol13 | None:
        stock = super().get_websocket_protocol()
        if not isinstance(stock, WebSocketProtocol13):
            return stock
        return ClosingProtocol(self, False, stock.params)
