"""Reliability, CI tier (issue 13): the long suite's own code (``benchmarks/reliability.py``)
on a small, seeded budget. A real ``medseek serve`` subprocess (tokens on, de-identification
key configured) takes a PHI probe, 200 mutation-fuzz cases through the real gRPC API and
the auth matrix; its store, indexes, log and every response are then searched for the
probe's identifiers. Two SIGKILL-during-ingest trials run on a server of their own.

Deadlines are 60 s per request and count as hangs only when exceeded, so a slow machine
makes the tier slower, never red. The long tier (10,000 cases, 20 trials, overload) is
``python benchmarks/reliability.py``; its numbers are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc")  # the [server] extra
pytest.importorskip("grpc_health")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import reliability  # noqa: E402
import reliability_seeds as seeds  # noqa: E402
import reliability_trials as trials  # noqa: E402
from reliability_server import ServerProcess  # noqa: E402

from medseek.serve.client import RetrievalClient  # noqa: E402
from medseek.serve.v1 import retrieval_pb2 as pb  # noqa: E402

CASES = 200

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    """The CI tier's fuzz + PHI + auth run (one server), as ``reliability`` reports it."""
    work = tmp_path_factory.mktemp("reliability")
    return reliability.fuzz_phi_auth(work / "fuzz", CASES, seed=0, workers=1,
                                     out_dir=work, log=lambda *a: None)


def _defects(result, kind):
    return [d for d in result["defects"] if d["kind"] == kind]


def test_every_fuzz_case_ran_and_reached_the_server(fuzzed):
    assert fuzzed["cases"] == CASES
    assert fuzzed["kinds"].get("harness-error", 0) == 0
    # the mutations are not all refused at the door: some went all the way to a commit
    assert fuzzed["codes"].get("OK", 0) >= CASES // 10
    assert fuzzed["codes"].get("INVALID_ARGUMENT", 0) >= CASES // 10


def test_fuzzing_crashes_and_hangs_nothing(fuzzed):
    assert fuzzed["crashes"] == 0, fuzzed["crash_events"]
    assert fuzzed["hangs"] == 0, _defects(fuzzed, "hang")
    assert fuzzed["clean_exit"], "the server did not shut down cleanly after the fuzz cases"


def test_fuzzing_gets_no_internal_error(fuzzed):
    assert fuzzed["internal"] == 0, _defects(fuzzed, "internal")


def test_index_agrees_with_store_after_fuzzing(fuzzed):
    assert fuzzed["index_mismatch"] == {}, fuzzed["index_vs_store"]


def test_no_phi_in_store_index_log_or_responses(fuzzed):
    assert fuzzed["phi_needles"] >= 10
    assert "store.db" in fuzzed["phi_files"] and any(f.endswith(".npz")
                                                     for f in fuzzed["phi_files"])
    assert fuzzed["phi_found"] == 0, fuzzed["phi_hits"]


def test_auth_matrix_every_rpc_refuses_bad_credentials(fuzzed):
    auth = fuzzed["auth"]
    assert auth["tried"] == 8 * len(trials.BAD_CREDENTIALS) + 8  # 8 RPCs (Draft aside)
    assert auth["failures"] == []


def test_sigkill_during_ingest_loses_no_acknowledged_item(tmp_path):
    result = trials.sigkill_trials(tmp_path, 2, seed=0, log=lambda *a: None)
    assert result["trials"] == 2 and result["acked"] > 0
    assert result["lost"] == 0, result["lost_ids"]
    assert result["index_mismatches"] == []


# -- defects the long tier found (fixed in medseek.io.nifti), each as its smallest reproducer -----
@pytest.fixture(scope="module")
def plain_server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("repro"), tokens=False) as s:
        yield s


def _search_volume_code(server, data: bytes) -> grpc.StatusCode:
    with RetrievalClient(server.address) as c:
        try:
            c.search(pb.SearchRequest(volume=data, k=1), timeout=60)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_nifti_without_dimensions_is_invalid_argument(plain_server):
    data = bytearray(seeds.nibabel_file("anatomical.nii"))  # big-endian NIfTI-1
    struct.pack_into(">h", data, 40, -1)  # dim[0] = -1
    assert _search_volume_code(plain_server, bytes(data)) == grpc.StatusCode.INVALID_ARGUMENT


def test_nifti_with_a_degenerate_orientation_is_invalid_argument(plain_server):
    import nibabel as nib
    import numpy as np

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[1, 0] = 1e30  # det 8, finite, but the y row leans on x by 1e30
    data = nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), affine).to_bytes()
    assert _search_volume_code(plain_server, data) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("volumes", [0, -1])
def test_nifti_with_no_volumes_is_invalid_argument(plain_server, volumes):
    import nibabel as nib
    import numpy as np

    data = bytearray(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.int16), np.eye(4)).to_bytes())
    struct.pack_into("<h", data, 48, volumes)  # dim[4]
    assert _search_volume_code(plain_server, bytes(data)) == grpc.StatusCode.INVALID_ARGUMENT
