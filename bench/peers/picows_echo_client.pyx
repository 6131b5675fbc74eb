# cython: language_level=3
"""The reference client's hot path: a picows WSListener in Cython.

Every data frame that arrives is counted; when picows says it was the last
frame of the read (``frame.last_in_buffer``), the echoes of that read go back
as ONE write of pre-built, pre-masked frames (``batches[k]`` = k copies),
straight to the underlying transport: no Python call per message, one per
read.  Pings are answered with picows' own send_pong.
"""

from picows.picows cimport WSFrame, WSListener, WSMsgType, WSTransport


cdef class EchoListener(WSListener):
    cdef public long long received
    cdef public long long sent
    cdef public bint refill
    cdef public list batches  # batches[k]: k pre-masked frames in one bytes object (k <= in flight)
    cdef object write
    cdef long long pending

    def __init__(self, list batches):
        self.batches = batches
        self.received = 0
        self.sent = 0
        self.refill = False
        self.pending = 0

    cpdef on_ws_connected(self, WSTransport transport):
        self.write = transport.underlying_transport.write

    cpdef on_ws_frame(self, WSTransport transport, WSFrame frame):
        cdef long long k
        if frame.msg_type == WSMsgType.BINARY or frame.msg_type == WSMsgType.TEXT or (
                frame.msg_type == WSMsgType.CONTINUATION):
            if frame.fin:
                self.received += 1
                self.pending += 1
        elif frame.msg_type == WSMsgType.PING:
            transport.send_pong(frame.get_payload_as_bytes())
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.disconnect()
            return
        if frame.last_in_buffer and self.pending:
            if self.refill:
                k = self.pending
                while k > 0:
                    m = min(k, len(self.batches) - 1)
                    self.write(self.batches[m])
                    k -= m
                self.sent += self.pending
            self.pending = 0

    def send_batch(self, long long k):
        """Start the pipeline: k messages in one write."""
        self.write(self.batches[k])
        self.sent += k
