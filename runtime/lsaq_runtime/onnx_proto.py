"""A small, strict reader of the ONNX protobuf fields the runtime must check before trusting a graph.

The runtime cannot hand a graph to ONNX Runtime and hope: an initializer's external data may name
any file, and the graph may compute with other tensors or precisions than the manifest says. So
it reads the graph itself first. It has no `onnx` dependency: this decodes the protobuf wire
format directly (varints and length-delimited fields, https://protobuf.dev/programming-guides/
encoding/) and keeps only what the checks need:

- every tensor that carries data, wherever it sits (graph initializers, node attributes,
  sparse tensors), with its external-data entries; tensors in subgraphs, functions or training
  info are refused rather than followed, since LSAQ graphs have none;
- nodes: op type, domain, inputs and integer attributes (MatMulNBits' `bits`, `block_size`);
- graph inputs and outputs: element type and shape.

Anything malformed (truncated field, varint longer than 10 bytes, nesting past a fixed depth) is
a `GraphFormatError`, never an IndexError from deep inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_DEPTH = 16

# TensorProto.DataType values the checks care about.
DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 10: "float16", 11: "float64",
          16: "bfloat16"}
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


class GraphFormatError(ValueError):
    """The bytes are not an ONNX model this reader accepts."""


@dataclass
class Tensor:
    name: str
    dtype: int
    dims: list[int]
    external: dict[str, str]         # external_data key -> value ({} when the data is inline)
    data_location: int
    where: str                       # "initializer", "attribute" or "sparse"


@dataclass
class Node:
    op_type: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    ints: dict[str, int]


@dataclass
class ValueInfo:
    name: str
    elem_type: int | None
    dims: list[int | str] | None     # int = fixed size, str = symbolic, None = no shape


@dataclass
class Graph:
    ir_version: int = 0
    opsets: dict[str, int] = field(default_factory=dict)
    tensors: list[Tensor] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    inputs: list[ValueInfo] = field(default_factory=list)
    outputs: list[ValueInfo] = field(default_factory=list)

    @property
    def initializers(self) -> dict[str, Tensor]:
        return {t.name: t for t in self.tensors if t.where == "initializer"}


# ------------------------------------------------------------------------------- wire format
def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    for _ in range(10):
        if pos >= end:
            raise GraphFormatError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
    raise GraphFormatError("varint longer than 10 bytes")


def _fields(buf: bytes, start: int = 0, end: int | None = None):
    """(field number, wire type, value) of one message; value is an int for varints and
    fixed-width fields, a (start, end) span for length-delimited ones."""
    pos, end = start, len(buf) if end is None else end
    while pos < end:
        key, pos = _varint(buf, pos, end)
        num, wt = key >> 3, key & 7
        if num == 0:
            raise GraphFormatError("field number 0")
        if wt == 0:
            val, pos = _varint(buf, pos, end)
        elif wt == 1:
            if pos + 8 > end:
                raise GraphFormatError("truncated fixed64")
            val, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wt == 5:
            if pos + 4 > end:
                raise GraphFormatError("truncated fixed32")
            val, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        elif wt == 2:
            n, pos = _varint(buf, pos, end)
            if n > end - pos:
                raise GraphFormatError("length-delimited field runs past its message")
            val, pos = (pos, pos + n), pos + n
        else:  # groups (3, 4) are not used by ONNX
            raise GraphFormatError(f"unsupported wire type {wt}")
        yield num, wt, val


def _str(buf: bytes, span) -> str:
    if not isinstance(span, tuple):
        raise GraphFormatError("expected a string field")
    try:
        return buf[span[0]:span[1]].decode("utf-8")
    except UnicodeDecodeError:
        raise GraphFormatError("a string field is not UTF-8") from None


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _span(v):
    if not isinstance(v, tuple):
        raise GraphFormatError("expected an embedded message")
    return v


def _packed_or_single(buf, wt, val) -> list[int]:
    if wt == 0:
        return [_signed(val)]
    s, e = _span(val)
    out = []
    while s < e:
        x, s = _varint(buf, s, e)
        out.append(_signed(x))
    return out


# ------------------------------------------------------------------------------- messages
def _tensor(buf, span, where: str, depth: int) -> Tensor:
    name, dtype, dims, ext, loc = "", 0, [], {}, 0
    for num, wt, val in _fields(buf, *span):
        if num == 1:
            dims += _packed_or_single(buf, wt, val)
        elif num == 2:
            dtype = val
        elif num == 8:
            name = _str(buf, val)
        elif num == 13:
            k = v = ""
            for n2, _, v2 in _fields(buf, *_span(val)):
                if n2 == 1:
                    k = _str(buf, v2)
                elif n2 == 2:
                    v = _str(buf, v2)
            if k in ext:
                raise GraphFormatError(f"tensor {name!r}: external_data key {k!r} given twice")
            ext[k] = v
        elif num == 14:
            loc = val
    return Tensor(name, dtype, dims, ext, loc, where)


def _sparse(buf, span, g: Graph, depth: int) -> None:
    for num, _, val in _fields(buf, *span):
        if num in (1, 2):
            g.tensors.append(_tensor(buf, _span(val), "sparse", depth + 1))


def _attribute(buf, span, node: Node, g: Graph, depth: int) -> None:
    name, ival = "", None
    for num, wt, val in _fields(buf, *span):
        if num == 1:
            name = _str(buf, val)
        elif num == 3:
            ival = _signed(val)
        elif num in (5, 10):
            g.tensors.append(_tensor(buf, _span(val), "attribute", depth + 1))
        elif num in (22, 23):
            _sparse(buf, _span(val), g, depth + 1)
        elif num in (6, 11):
            raise GraphFormatError(f"node {node.op_type}: subgraph attributes are not accepted "
                                   "(LSAQ graphs have none)")
    if ival is not None:
        node.ints[name] = ival


def _node(buf, span, g: Graph, depth: int) -> Node:
    node = Node("", "", [], [], {})
    attrs = []
    for num, _, val in _fields(buf, *span):
        if num == 1:
            node.inputs.append(_str(buf, val))
        elif num == 2:
            node.outputs.append(_str(buf, val))
        elif num == 4:
            node.op_type = _str(buf, val)
        elif num == 7:
            node.domain = _str(buf, val)
        elif num == 5:
            attrs.append(_span(val))
    for a in attrs:
        _attribute(buf, a, node, g, depth + 1)
    return node


def _value_info(buf, span) -> ValueInfo:
    name, elem, dims = "", None, None
    for num, _, val in _fields(buf, *span):
        if num == 1:
            name = _str(buf, val)
        elif num == 2:
            for n2, _, v2 in _fields(buf, *_span(val)):
                if n2 != 1:  # sequence, map, optional...: not a plain tensor
                    continue
                for n3, _, v3 in _fields(buf, *_span(v2)):
                    if n3 == 1:
                        elem = v3
                    elif n3 == 2:
                        dims = []
                        for n4, _, v4 in _fields(buf, *_span(v3)):
                            if n4 != 1:
                                continue
                            d: int | str = "?"
                            for n5, _, v5 in _fields(buf, *_span(v4)):
                                if n5 == 1:
                                    d = _signed(v5)
                                elif n5 == 2:
                                    d = _str(buf, v5)
                            dims.append(d)
    return ValueInfo(name, elem, dims)


def _graph(buf, span, g: Graph, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise GraphFormatError("nested too deeply")
    for num, _, val in _fields(buf, *span):
        if num == 1:
            g.nodes.append(_node(buf, _span(val), g, depth + 1))
        elif num == 5:
            g.tensors.append(_tensor(buf, _span(val), "initializer", depth + 1))
        elif num == 15:
            _sparse(buf, _span(val), g, depth + 1)
        elif num == 11:
            g.inputs.append(_value_info(buf, _span(val)))
        elif num == 12:
            g.outputs.append(_value_info(buf, _span(val)))


def read_model(buf: bytes) -> Graph:
    """The checked facts of a serialized ModelProto."""
    g = Graph()
    graphs = 0
    for num, _, val in _fields(buf):
        if num == 1:
            g.ir_version = val
        elif num == 8:
            dom, ver = "", 0
            for n2, _, v2 in _fields(buf, *_span(val)):
                if n2 == 1:
                    dom = _str(buf, v2)
                elif n2 == 2:
                    ver = v2
            g.opsets[dom] = ver
        elif num == 7:
            graphs += 1
            _graph(buf, _span(val), g, 1)
        elif num in (20, 25):
            raise GraphFormatError("training info and model-local functions are not accepted "
                                   "(LSAQ graphs have none)")
    if graphs != 1:
        raise GraphFormatError("no graph in the model" if not graphs else "more than one graph")
    return g
