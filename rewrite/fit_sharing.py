"""Fitted tables between ranks: what one rank fitted, as bytes every rank can rebuild exactly.

Message = u64 little-endian length of a JSON header, the header, then a safetensors blob:
    header  {"error": null | {"message", "exit_code"}, "tables": [{"report": TableReport fields,
             "spec": Representation.spec() or null}]}
    tensors "<table>/<state-dict key>" -> the representation's tensors, raw bytes and dtype
A representation is rebuilt as the native format does it (``from_params(**params)`` then
``load_state_dict``), so a table fitted on rank k is bit-identical on every rank: the one-process
and the N-process results are the same bytes.  No pickle is involved.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import safetensors.torch

from rewrite.core.embedding import Representation, representation_class
from rewrite.distributed import Group, RankError, one_line

HEADER = struct.Struct("<Q")


def _plain(value: Any) -> Any:
    """JSON for the numpy / torch values a pass puts in its report notes."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def encode(fitted: list[tuple[Any, Representation | None]], error: BaseException | None) -> bytes:
    """One rank's (report, representation or None) per table it fitted, or the error it hit."""
    tables, tensors = [], {}
    for report, rep in fitted:
        tables.append({"report": vars(report), "spec": None if rep is None else rep.spec()})
        if rep is not None:
            tensors.update({f"{report.table}/{k}": v.detach().contiguous().clone()
                            for k, v in rep.state_dict().items()})
    head = {"error": None if error is None else {"message": one_line(error),
                                                  "exit_code": getattr(error, "exit_code", 2)},
            "tables": tables}
    text = json.dumps(head, default=_plain).encode()
    return HEADER.pack(len(text)) + text + safetensors.torch.save(tensors)


def decode(blob: bytes, report_type: type) -> tuple[dict | None, list[tuple[Any, Representation | None]]]:
    """(error or None, [(report, representation or None)]) from ``encode``'s bytes."""
    (n,) = HEADER.unpack_from(blob)
    head = json.loads(blob[HEADER.size:HEADER.size + n])
    tensors = safetensors.torch.load(blob[HEADER.size + n:])
    out = []
    for t in head["tables"]:
        report = report_type(**t["report"])
        rep = None
        if t["spec"] is not None:
            params = {k: v for k, v in t["spec"].items() if k != "kind"}
            rep = representation_class(t["spec"]["kind"]).from_params(**params)
            prefix = f"{report.table}/"
            rep.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                                assign=True)
            rep.eval()
        out.append((report, rep))
    return head["error"], out


def share(group: Group, fitted: list[tuple[Any, Representation | None]], error: BaseException | None,
          report_type: type) -> dict[str, tuple[Any, Representation | None]]:
    """Every rank's fits, by table name, on every rank; the lowest failing rank's error raised
    on all of them (nothing is kept: the caller writes nothing).  This rank's own fits are kept
    as they are (not rebuilt)."""
    blobs = group.exchange(encode(fitted, error) if error is None else encode([], error))
    decoded = [decode(b, report_type) if r != group.rank or error is not None else (None, [])
               for r, b in enumerate(blobs)]
    for rank, (err, _) in enumerate(decoded):
        if err is not None:
            raise RankError(rank, err["message"], err["exit_code"]) from (error if rank == group.rank else None)
    out = {report.table: (report, rep) for _, fits in decoded for report, rep in fits}
    out.update({report.table: (report, rep) for report, rep in fitted})
    return out
