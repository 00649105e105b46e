"""The NBD handshake: fixed-newstyle negotiation up to the transmission phase.

Over any ``trio.abc.Stream``, with no policy, as :mod:`nbd_proto` (whose
numbers and reader it uses): every protocol violation raises
:class:`NBDProtocolError`, an early end of stream :class:`NBDConnectionLost`.
"""

from __future__ import annotations

import struct

import trio

from .base import DiskError
from .nbd_proto import (FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_BLOCK_SIZE,
                        INFO_EXPORT, MAX_OPTION_REPLY, NBDMAGIC, OLDSTYLE_MAGIC,
                        OPT_EXPORT_NAME, OPT_GO, OPT_REPLY_MAGIC, OPT_STRUCTURED_REPLY,
                        REP_ACK, REP_ERR, REP_ERR_NAMES, REP_ERR_UNSUP, REP_INFO, ExportInfo,
                        NBDConnectionLost, NBDProtocolError, Reader)
from .nbd_sock import make_reader


def encode_option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def encode_go(export: str, infos: tuple[int, ...] = (INFO_BLOCK_SIZE,)) -> bytes:
    name = export.encode()
    return struct.pack(f">I{len(name)}sH{len(infos)}H", len(name), name, len(infos), *infos)


async def _option_reply(reader: Reader, opt: int) -> tuple[int, bytes]:
    magic, ropt, rtype, length = struct.unpack(">QIII", await reader.exactly(20))
    if magic != OPT_REPLY_MAGIC:
        raise NBDProtocolError(f"bad option reply magic {magic:#x}")
    if ropt != opt:
        raise NBDProtocolError(f"reply to option {ropt} while waiting for option {opt}")
    if length > MAX_OPTION_REPLY:
        raise NBDProtocolError(f"option reply of {length} bytes is too long")
    return rtype, await reader.exactly(length)


def _option_error(what: str, rtype: int, data: bytes) -> DiskError:
    msg = data.decode(errors="replace").strip()
    name = REP_ERR_NAMES.get(rtype, f"error {rtype - REP_ERR}")
    return DiskError(f"{what}: {name}" + (f" ({msg})" if msg else ""))


async def handshake(stream: trio.abc.Stream, export: str, *,
                    structured: bool = True) -> tuple[ExportInfo, Reader]:
    """Fixed-newstyle negotiation up to the transmission phase.

    Asks for structured replies (when ``structured``), then NBD_OPT_GO with
    NBD_INFO_BLOCK_SIZE (which commits us to the server's limits); falls back
    to NBD_OPT_EXPORT_NAME only for servers without NBD_OPT_GO.
    """
    reader = make_reader(stream)  # a socket's is read without trio's stream layer
    try:
        magic, second, hflags = struct.unpack(">QQH", await reader.exactly(18))
        if magic != NBDMAGIC:
            raise NBDProtocolError(f"not an NBD server (magic {magic:#x})")
        if second == OLDSTYLE_MAGIC:
            raise NBDProtocolError("oldstyle NBD servers are not supported")
        if second != IHAVEOPT:
            raise NBDProtocolError(f"bad handshake magic {second:#x}")
        if not hflags & FLAG_FIXED_NEWSTYLE:
            raise NBDProtocolError("server does not speak fixed-newstyle NBD")
        cflags = FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES)
        await stream.send_all(struct.pack(">I", cflags))

        sr = False
        if structured:
            await stream.send_all(encode_option(OPT_STRUCTURED_REPLY))
            rtype, data = await _option_reply(reader, OPT_STRUCTURED_REPLY)
            if rtype == REP_ACK:
                sr = True
            elif not rtype & REP_ERR:
                raise NBDProtocolError(f"unexpected reply {rtype} to structured-reply option")

        await stream.send_all(encode_option(OPT_GO, encode_go(export)))
        info = ExportInfo(size=-1, flags=0, structured=sr)
        while True:
            rtype, data = await _option_reply(reader, OPT_GO)
            if rtype == REP_ACK:
                break
            if rtype == REP_INFO:
                _parse_info(info, data)
                continue
            if rtype == REP_ERR_UNSUP:
                return await _export_name(stream, reader, export, cflags, sr), reader
            if rtype & REP_ERR:
                raise _option_error(f"export {export!r}", rtype, data)
            raise NBDProtocolError(f"unexpected reply {rtype} to NBD_OPT_GO")
        if info.size < 0:
            raise NBDProtocolError("server accepted NBD_OPT_GO without NBD_INFO_EXPORT")
        return info, reader
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
        raise NBDConnectionLost(f"connection lost during handshake: {e}") from None


def _parse_info(info: ExportInfo, data: bytes) -> None:
    if len(data) < 2:
        raise NBDProtocolError("empty NBD_REP_INFO")
    (itype,) = struct.unpack_from(">H", data)
    if itype == INFO_EXPORT:
        if len(data) != 12:
            raise NBDProtocolError(f"NBD_INFO_EXPORT of {len(data)} bytes")
        info.size, info.flags = struct.unpack_from(">QH", data, 2)
    elif itype == INFO_BLOCK_SIZE:
        if len(data) != 14:
            raise NBDProtocolError(f"NBD_INFO_BLOCK_SIZE of {len(data)} bytes")
        mn, pref, mx = struct.unpack_from(">III", data, 2)
        if mn < 1 or mn & (mn - 1) or mn > 65536 or pref < mn or mx < mn:
            raise NBDProtocolError(f"nonsensical block sizes min={mn} pref={pref} max={mx}")
        info.min_block, info.pref_block, info.max_payload = mn, pref, mx
    # other information types are ignored, as the spec requires


async def _export_name(stream: trio.abc.Stream, reader: Reader, export: str,
                       cflags: int, sr: bool) -> ExportInfo:
    await stream.send_all(encode_option(OPT_EXPORT_NAME, export.encode()))
    size, flags = struct.unpack(">QH", await reader.exactly(10))
    if not cflags & FLAG_NO_ZEROES:
        await reader.exactly(124)
    return ExportInfo(size=size, flags=flags, structured=sr)
