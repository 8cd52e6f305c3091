"""The real default model (all-MiniLM-L6-v2 as IBertModel), compiled as the README measures it:
default calibration (256 movie-review sentences), seq 64, scored on the 64 held-out sentences of
scripts/accuracy.py, so that the README's accuracy figures are asserted here."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import compile_capturing

SEQ = 64  # README "Results so far": scripts/accuracy.py's default length
# README: "ibert-tvm vs FP32 ... embedding cosine mean 0.9916, min 0.9827" (floors, not the figures
# themselves, so that a better calibration does not fail; one that loses accuracy does)
README_COSINE_MEAN = 0.991
README_COSINE_MIN = 0.982
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def default_artifact(tmp_path_factory):
    from ibert_tvm.compile import CompileOptions

    # no calib_texts: the default model is calibrated on default_calibration_texts(), as compile does it
    opt = CompileOptions(model="default", target="host", batches=(1,), seq_len=SEQ,
                         out=tmp_path_factory.mktemp("default") / "art", progress=False)
    return compile_capturing(opt)


@pytest.fixture(scope="session")
def sentences() -> list[str]:
    """scripts/accuracy.py's 64 held-out sentences: every 37th movie sentence that is not calibration text."""
    from ibert_tvm.compile import default_calibration_texts
    from ibert_tvm.evaluation.data import movie_sentences

    calib = set(default_calibration_texts())
    return [t for _, t in movie_sentences()[1::37] if t not in calib][:64]


def test_default_model_bit_exact(default_artifact, sentences):
    from ibert_tvm import reference
    from ibert_tvm.runner import Runner

    path, program = default_artifact
    assert (program.hidden, len(program.layers)) == (384, 6)
    r = Runner(path)
    # 8 of the 64: the NumPy reference needs ~6 s for 8 at seq 64 (scripts/accuracy.py checks all 64)
    ids, mask, _ = r.encode(sentences[:8], truncation=True).values()
    got, want = r.run_integer(ids, mask), reference.run(program, ids, mask)
    for name in program.outputs:
        differing = int((got[name] != want[name]).sum())
        print(f"{name}: {differing} of {got[name].size} elements differ")
        assert differing == 0


def test_default_model_close_to_fp32(default_artifact, sentences):
    from ibert_tvm import pipeline
    from ibert_tvm.evaluation.fp32 import fp32_embeddings

    assert len(sentences) == 64
    ours = pipeline("sentence-embedding", default_artifact[0])(sentences, truncation=True)
    ref = fp32_embeddings("default", sentences, SEQ)
    # divided by the norms here rather than trusting both embeddings to come back unit-length
    cos = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    sim_int, sim_fp = ours @ ours.T, ref @ ref.T
    off = ~np.eye(len(sentences), dtype=bool)
    print(f"cosine(int8, fp32) on {len(sentences)} sentences at seq {SEQ}: mean {cos.mean():.4f}, min {cos.min():.4f}")
    print(f"pairwise similarity max |int8 - fp32|: {np.abs(sim_int - sim_fp)[off].max():.4f}")
    assert cos.mean() >= README_COSINE_MEAN, "README: embedding cosine to FP32 0.9916 mean on these sentences"
    assert cos.min() >= README_COSINE_MIN, "README: embedding cosine to FP32 0.9827 min on these sentences"
