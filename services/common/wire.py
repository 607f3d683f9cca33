"""Find which string field of a protobuf message holds invalid UTF-8, from the raw bytes.

The protobuf runtime rejects such a message as a whole; walking the wire format lets the server name
the field in its INVALID_ARGUMENT error (e.g. "chat.messages[0].content").
"""
from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.internal.decoder import _DecodeVarint

_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5


def invalid_utf8_field(desc: Descriptor, data: bytes, prefix: str = "") -> str | None:
    """The first string field holding invalid UTF-8, or None; raises on bytes that are not protobuf at all."""
    pos, counts = 0, {}
    while pos < len(data):
        tag, pos = _DecodeVarint(data, pos)
        number, wire = tag >> 3, tag & 7
        if wire == _WIRE_VARINT:
            _, pos = _DecodeVarint(data, pos)
            continue
        if wire in (_WIRE_I64, _WIRE_I32):
            pos += 8 if wire == _WIRE_I64 else 4
            continue
        if wire != _WIRE_LEN:
            raise ValueError(f"wire type {wire} at byte {pos}: not a valid protobuf message")
        size, pos = _DecodeVarint(data, pos)
        payload, pos = data[pos:pos + size], pos + size
        field = desc.fields_by_number.get(number)
        if field is None:
            continue
        name = prefix + field.name
        if field.is_repeated:
            name += f"[{counts.get(number, 0)}]"
            counts[number] = counts.get(number, 0) + 1
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                return name
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            found = invalid_utf8_field(field.message_type, payload, name + ".")
            if found:
                return found
    return None
