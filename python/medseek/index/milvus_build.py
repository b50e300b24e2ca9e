"""Where a Milvus index build stands, and how to tell that the built index answers.

Milvus indexes sealed segments in the background, and on a 2.3 server three things lag
each other: the build itself, ``describe_index``'s counts (refreshed about once a
minute), and the query nodes swapping the built index in (until then a sealed segment is
searched through an exact, temporary IVF_FLAT "interim" index, and a growing one by brute
force). ``MilvusIndex.wait_for_index`` waits on all three with the two functions here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["IndexState", "codes_answer", "read_index_state"]

#: a search of a stored unit vector for itself scores 1 within this on every exact path
_EXACT_TOL = 1e-4


@dataclass(frozen=True)
class IndexState:
    """Where a Milvus index build stands (``MilvusIndex.index_state``).

    ``total_rows``/``indexed_rows``/``pending_index_rows``/``state`` are
    ``describe_index``'s (rows of flushed segments); ``loaded_sealed_rows`` counts the rows
    of the sealed segments the query nodes serve, which they load only once indexed (None
    where the server cannot list them: milvus-lite).
    """

    index_type: str
    state: str
    total_rows: int
    indexed_rows: int
    pending_index_rows: int
    loaded_sealed_rows: int | None
    fail_reason: str = ""

    @property
    def failed(self) -> bool:
        return self.state == "Failed"

    @property
    def built(self) -> bool:
        """True when every flushed row is indexed and served as a sealed segment.

        Both signals are needed on a 2.3 server: ``describe_index`` may count the rows
        indexed while a growing segment still answers the searches, and the query nodes
        load a sealed segment before its index exists (searching it through a temporary
        IVF_FLAT "interim" index, so IVF_PQ answers like IVF_FLAT until the swap); 2.3's
        ``describe_index`` counts also lag the build by up to a minute, by which time the
        query nodes have usually swapped the real index in. Without the segment listing
        (milvus-lite, which indexes as it inserts), ``describe_index`` decides.
        """
        if self.failed:
            return False
        if self.total_rows == 0:
            return True
        indexed = self.indexed_rows >= self.total_rows and self.pending_index_rows == 0
        served = self.loaded_sealed_rows is None or self.loaded_sealed_rows >= self.total_rows
        return indexed and served


def read_index_state(client, name: str, field: str, lists_segments: bool
                     ) -> tuple[IndexState, bool]:
    """``IndexState`` of the index on ``field`` of collection ``name``.

    ``lists_segments`` False skips the query nodes' segment listing (milvus-lite has none);
    the second value returned says whether to ask for it next time (False once the server
    answered UNIMPLEMENTED).
    """
    import grpc  # pymilvus's transport (imported lazily, like pymilvus)

    desc = client.describe_index(name, field)
    sealed = None
    if lists_segments:
        try:
            segments = client.list_loaded_segments(name)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            lists_segments = False
        else:
            sealed = sum(int(s.num_rows) for s in segments
                         if getattr(getattr(s, "state", None), "name", "") == "Sealed")
    state = IndexState(
        index_type=str(desc.get("index_type", "")), state=str(desc.get("state", "")),
        total_rows=int(desc.get("total_rows", 0)), indexed_rows=int(desc.get("indexed_rows", 0)),
        pending_index_rows=int(desc.get("pending_index_rows", 0)), loaded_sealed_rows=sealed,
        fail_reason=str(desc.get("index_state_fail_reason", "") or ""))
    return state, lists_segments


def codes_answer(client, name: str, field: str, search_params: dict) -> bool:
    """True when searches of ``name`` score from a quantised index's codes (PQ, SQ).

    Neither ``describe_index`` nor the segment listing shows the query nodes swapping the
    interim index for the built one. A few stored vectors searched for themselves score
    exactly 1 (within float error) on every exact path, and off by the quantisation error
    (~1e-3 for SQ8, more for PQ) through the codes. An empty collection counts as True.
    """
    rows = client.query(name, filter="", output_fields=[field], limit=8,
                        consistency_level="Strong")
    if not rows:
        return True
    probe = [np.asarray(r[field], dtype=np.float32) for r in rows]
    hits = client.search(name, data=probe, limit=1, anns_field=field,
                         search_params=search_params, consistency_level="Strong")
    return any(abs(h[0]["distance"] - 1.0) > _EXACT_TOL for h in hits if len(h))
