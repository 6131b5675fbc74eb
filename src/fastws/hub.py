"""Who is connected, and fan-out: sessions by id and by user, rooms, broadcast.

A message published to many sessions is framed once; every target gets the
same bytes object (sessions that negotiated compression get it compressed
for them instead).  A backplane (Redis pub/sub) carries publications to the
other nodes; each node delivers to its own sessions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from fastws._frame import OP_BINARY, OP_TEXT, bad_message_reason, encode_frame, fanout

if TYPE_CHECKING:
    from fastws.connection import Session


class Backplane(Protocol):
    """Carries hub publications to the other nodes (see fastws.backplane.redis).

    The hub tells it which rooms and users have members on this node, so that
    publications only travel to nodes that have someone to deliver them to.
    """

    def publish(self, room: str, message: str | bytes) -> None: ...

    def broadcast(self, message: str | bytes) -> None: ...

    def send_to_user(self, user: str, message: str | bytes) -> None: ...

    def local_room(self, room: str, present: bool) -> None: ...

    def local_user(self, user: str, present: bool) -> None: ...


def _check_message(message: Any) -> None:
    """A message is a str or a bytes-like object: refused before anything is sent (to another node
    too), with the reason."""
    if not isinstance(message, (str, bytes)):
        try:
            memoryview(message)
        except TypeError:
            raise TypeError(bad_message_reason(message)) from None


def _frame_for(message: str | bytes, deflate: Any = None) -> bytes:
    """The frame for ``message``, compressed with ``deflate``'s settings if it has any."""
    opcode = OP_TEXT if isinstance(message, str) else OP_BINARY
    if deflate is not None:
        payload = message.encode() if isinstance(message, str) else message
        if len(payload) >= deflate.compress_threshold:
            return encode_frame(opcode, deflate.compress(message), rsv1=True)
    return encode_frame(opcode, message)


class Hub:
    """Registry and fan-out for the sessions of one server process."""

    def __init__(self) -> None:
        self.sessions: dict[int, Session] = {}
        self._by_user: dict[Any, set[Session]] = {}
        self._user_names: dict[str, Any] = {}  # str(user) -> user, for users that are not str
        self._rooms: dict[str, set[Session]] = {}
        self.backplane: Backplane | None = None
        # called with (local recipients, seconds) after each publication's fan-out (metrics)
        self.on_fanout: Callable[[int, float], None] | None = None

    # -- registry ---------------------------------------------------------------

    def add(self, session: Session) -> None:
        self.sessions[session.id] = session

    def remove(self, session: Session) -> None:
        """Forget a closed session everywhere (called by the server)."""
        self.sessions.pop(session.id, None)
        if session.user is not None:
            self._leave_user(session)
        for room in session.rooms or ():
            self._leave_room(room, session)
        session.rooms = None

    def get(self, session_id: int) -> Session | None:
        return self.sessions.get(session_id)

    def set_user(self, session: Session, user: Any) -> bool:
        """Tag ``session`` as belonging to ``user`` (one user may have many sessions).

        A session that is closing or closed is not registered (False): it would
        never be removed.
        """
        if session.closed:
            return False
        if session.user is not None:
            self._leave_user(session)
        session.user = user
        if user is not None:
            sessions = self._by_user.get(user)
            if sessions is None:
                sessions = self._by_user[user] = set()
                if not isinstance(user, str):
                    self._user_names[str(user)] = user
                if self.backplane is not None:
                    self.backplane.local_user(str(user), True)
            sessions.add(session)
        return True

    def user_sessions(self, user: Any) -> list[Session]:
        return list(self._by_user.get(user, ()))

    def send_to_user(self, user: Any, message: str | bytes) -> int:
        """Send to every session of ``user`` (on every node, given a backplane); returns how many
        local sessions it was written to."""
        _check_message(message)
        if self.backplane is not None:
            self.backplane.send_to_user(str(user), message)
        return self._deliver(self._by_user.get(user, ()), message)

    # -- rooms ------------------------------------------------------------------

    def join(self, session: Session, room: str) -> bool:
        """Add ``session`` to ``room``; False (and nothing kept) if the session is closing or closed."""
        if session.closed:
            return False
        members = self._rooms.get(room)
        if members is None:
            members = self._rooms[room] = set()
            if self.backplane is not None:
                self.backplane.local_room(room, True)
        members.add(session)
        if session.rooms is None:
            session.rooms = set()
        session.rooms.add(room)
        return True

    def leave(self, session: Session, room: str) -> None:
        self._leave_room(room, session)
        if session.rooms:
            session.rooms.discard(room)

    def members(self, room: str) -> list[Session]:
        return list(self._rooms.get(room, ()))

    def rooms(self) -> dict[str, int]:
        return {room: len(members) for room, members in self._rooms.items()}

    def publish(self, room: str, message: str | bytes, *, exclude: Session | None = None) -> int:
        """Send ``message`` to everyone in ``room`` (on every node, given a backplane).

        Returns the number of local sessions it was written to.
        """
        _check_message(message)
        if self.backplane is not None:
            self.backplane.publish(room, message)
        return self._deliver(self._rooms.get(room, ()), message, exclude)

    def broadcast(self, message: str | bytes, *, exclude: Session | None = None) -> int:
        """Send ``message`` to every open session (on every node, given a backplane)."""
        _check_message(message)
        if self.backplane is not None:
            self.backplane.broadcast(message)
        return self._deliver(self.sessions.values(), message, exclude)

    async def synced(self) -> None:
        """Wait until the backplane has handed every membership change and publication so far to
        the broker (nothing to wait for without one)."""
        synced = getattr(self.backplane, "synced", None)
        if synced is not None:
            await synced()

    # what the backplane brings from other nodes: delivered to the local sessions only

    def deliver_room(self, room: str, message: str | bytes) -> int:
        return self._deliver(self._rooms.get(room, ()), message)

    def deliver_all(self, message: str | bytes) -> int:
        return self._deliver(self.sessions.values(), message)

    def deliver_user(self, user: str, message: str | bytes) -> int:
        """``user`` is str(user) as another node named it (users are told apart by their str())."""
        return self._deliver(self._by_user.get(self._user_names.get(user, user), ()), message)

    def local_rooms(self) -> list[str]:
        """Rooms with members on this node (the backplane registers them again after a reconnect)."""
        return list(self._rooms)

    def local_users(self) -> list[str]:
        return [str(user) for user in self._by_user]

    def _leave_room(self, room: str, session: Session) -> None:
        members = self._rooms.get(room)
        if members is not None:
            members.discard(session)
            if not members:
                del self._rooms[room]
                if self.backplane is not None:
                    self.backplane.local_room(room, False)

    def _leave_user(self, session: Session) -> None:
        user = session.user
        sessions = self._by_user.get(user)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._by_user[user]
                self._user_names.pop(str(user), None)
                if self.backplane is not None:
                    self.backplane.local_user(str(user), False)

    # -- internals --------------------------------------------------------------

    def _deliver(self, targets: Iterable[Session], message: str | bytes, exclude: Session | None = None) -> int:
        if self.on_fanout is None:
            return self._fan_out(targets, message, exclude)
        started = time.perf_counter()
        count = self._fan_out(targets, message, exclude)
        self.on_fanout(count, time.perf_counter() - started)
        return count

    @staticmethod
    def _fan_out(targets: Iterable[Session], message: str | bytes, exclude: Session | None = None) -> int:
        # The plain frame is encoded once and written by the wire core to every plain session
        # (fanout: no Python call per recipient).  Sessions that compress without context
        # takeover share one compressed frame per set of settings (each message is compressed
        # alone, so those bytes suit all of them); one whose compressor keeps context between
        # messages compresses for itself.
        plain = encode_frame(OP_TEXT if isinstance(message, str) else OP_BINARY, message)
        count, others = fanout(list(targets), plain, exclude)  # a copy: a send may close a session
        frames: dict[Any, bytes] = {}
        for session in others:
            if session.closed:
                continue
            deflate = session.deflate
            if deflate is None:
                session.send_frame(plain)
            elif deflate.local_no_context_takeover:
                key = (deflate.local_max_window_bits, deflate.mem_level, deflate.level, deflate.compress_threshold)
                frame = frames.get(key)
                if frame is None:
                    frame = frames[key] = _frame_for(message, deflate)
                session.send_frame(frame)
            else:
                session.send(message)
            count += 1
        return count
